"""Named points where a test makes a run fail on purpose, at an exact step (a fault injected by
timing is not reproducible). Unset in normal runs: `reached` then costs one lookup.

    BEIT3_JAX_FAULT=kill_in_checkpoint_save:30   the process ends at once (exit status 137, as
                                                 under SIGKILL) inside the save of step 30's
                                                 checkpoint: its writes started, it is not
                                                 complete
    BEIT3_JAX_FAULT=sigterm_after_step:25        the process sends itself SIGTERM (what a
                                                 preemption sends) after step 25
    BEIT3_JAX_FAULT=kill_after_step:25           the process sends itself SIGKILL after step
                                                 25 (before that step's checkpoint, if any)
    BEIT3_JAX_FAULT=sigterm_group_after_step:25  SIGTERM to the whole process group after step
                                                 25 (the trainer and its data workers), as a
                                                 machine's shutdown sends it
"""

from __future__ import annotations

import os
import signal
import sys

ENV = 'BEIT3_JAX_FAULT'


def reached(point: str, step: int) -> None:
  """Injects the fault $BEIT3_JAX_FAULT names when it is `point` at `step`."""
  wanted = os.environ.get(ENV)
  if not wanted or wanted != f'{point}:{step}':
    return
  sys.stdout.flush()
  sys.stderr.write(f'{ENV}={wanted}: injecting the fault\n')
  sys.stderr.flush()
  if point == 'sigterm_after_step':
    os.kill(os.getpid(), signal.SIGTERM)
  elif point == 'sigterm_group_after_step':
    os.killpg(os.getpgrp(), signal.SIGTERM)
  elif point == 'kill_after_step':
    os.kill(os.getpid(), signal.SIGKILL)
  else:
    os._exit(137)
