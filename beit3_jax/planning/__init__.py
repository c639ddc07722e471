"""Ahead-of-time plans of a job on a TPU slice: compile its real train step, read memory/FLOPs."""
