"""Preemption: a run told to stop (SIGTERM, what Cloud TPU and `launch/tpu_pod.sh stop` send)
finishes its current step, checkpoints that step and exits, so that rerunning the command
resumes where it stopped and loses nothing.

One process: SIGTERM sets a flag that the loop reads after every step. Several processes (a
multi-host slice): JAX's coordination service already listens for the preemption notice, and
`multihost_utils.reached_preemption_sync_point(step)` turns true on every host at the same
step, so that all of them save that step together.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`reached(step)` says whether the run must stop after `step`; `close()` restores the
  previous SIGTERM handler. Use as a context manager around the training loop."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self.signal_name: str | None = None
    self._previous = None
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (called by every process at every step)."""
    if self.multi_process:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'the preemption notice'
        return True
      return False
    return self.signal_name is not None

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
