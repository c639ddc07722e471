"""The shared trainer every job uses: the jitted step, optimizer and schedules, checkpoints,
the loop, metric writers, the progress line, MFU and the run's saved config. It imports no job
and no task."""
