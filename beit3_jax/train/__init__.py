"""Training: objectives, the train step, optimizer, checkpoints, logging and the loop."""
