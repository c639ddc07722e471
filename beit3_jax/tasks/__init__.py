"""Fine-tuning and evaluation per task: heads' losses, metrics, decoding."""
