"""One run per workdir: process 0 of a run holds `<workdir>/run.lock` (local or gs://) and
renews it while the run lives (a lease), so that a second run started in the same workdir is
refused instead of writing the same checkpoints and metrics.

The lock is a JSON file: {host, pid, run_id, started, renewed, lease_seconds} (times in Unix
seconds, UTC). A lock is stale, and is taken over with a warning, when its lease has expired
(not renewed for `lease_seconds`), or when it names a process of this host that no longer
exists (a run killed here and restarted at once). Anything else refuses the new run with a
message naming the holder. The processes of one multi-host run share the workdir: only
process 0 takes the lock, and every process learns its answer.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from beit3_jax.defaults import ConfigError

LOCK_FILE = 'run.lock'


class WorkdirBusy(ConfigError):
  """Another live run holds the workdir's lock."""


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M:%S UTC')


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def stale_reason(holder: dict, now: float) -> str | None:
  """Why the lock `holder` (its JSON) no longer holds, or None while it does."""
  renewed, lease = float(holder.get('renewed', 0)), float(holder.get('lease_seconds', 0))
  if now - renewed > lease:
    return f'its lease expired at {_utc(renewed + lease)}'
  if holder.get('host') == socket.gethostname() and not _process_alive(int(holder.get('pid', 0))):
    return f'process {holder.get("pid")} no longer runs on this host'
  return None


class WorkdirLock:
  """Takes `<workdir>/run.lock` on `acquire()` (process 0), renews it from a background thread
  every `lease_seconds / 4`, and removes it on `release()` if it is still this run's."""

  def __init__(self, workdir, lease_seconds: float, *, clock=time.time):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.lease_seconds = float(lease_seconds)
    self._clock = clock
    self._run_id = uuid.uuid4().hex
    self._started = clock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.held = False

  def _record(self) -> dict:
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'run_id': self._run_id,
            'started': self._started, 'renewed': self._clock(),
            'lease_seconds': self.lease_seconds}

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}   # unreadable (e.g. cut short by a crash): treated as expired

  def try_acquire(self) -> str:
    """Takes the lock; returns a warning line ('' if none). Raises WorkdirBusy."""
    warning = ''
    holder = self._read()
    if holder is not None:
      reason = stale_reason(holder, self._clock()) if holder else 'it could not be read'
      if reason is None:
        raise WorkdirBusy(
            f'{self.path.parent} is in use by another run: host {holder.get("host")}, pid '
            f'{holder.get("pid")}, started {_utc(float(holder.get("started", 0)))}, lock renewed '
            f'{_utc(float(holder.get("renewed", 0)))} (lease {holder.get("lease_seconds")} s). '
            f'Stop that run, or use another --workdir; if it is gone, remove {self.path}, or '
            'wait for its lease to expire.')
      warning = (f'Warning: taking over the lock {self.path} of host {holder.get("host")}, pid '
                 f'{holder.get("pid")} ({reason}).')
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self._record()))
    self.held = True
    self._thread = threading.Thread(target=self._renew_loop, name='workdir-lock', daemon=True)
    self._thread.start()
    return warning

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        holder = self._read()
        if holder and holder.get('run_id') not in (None, self._run_id):
          print(f'Warning: {self.path} was taken by host {holder.get("host")}, pid '
                f'{holder.get("pid")}; two runs may now write this workdir.', flush=True)
          return
        self.path.write_text(json.dumps(self._record()))
      except Exception as e:  # noqa: BLE001 -- storage briefly unreachable (an OSError or
        # a gcsfs / aiohttp error): try again at the next renewal
        print(f'Warning: could not renew {self.path}: {e}', flush=True)

  def release(self, *, storage_lost: bool = False) -> None:
    """Stops renewing and removes the lock file if it is still this run's; with
    `storage_lost` (the workdir cannot be reached) only stops renewing: the lease then
    expires, and a rerun takes the lock over."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.held and storage_lost:
      self.held = False
    if self.held:
      holder = self._read()
      if holder and holder.get('run_id') == self._run_id:
        self.path.unlink()
      self.held = False


def acquire(workdir, lease_seconds: float) -> WorkdirLock | None:
  """The run's lock, taken by process 0 (None on other processes, or with lease_seconds <= 0:
  no lock). Every process raises WorkdirBusy when process 0 could not take it."""
  if lease_seconds <= 0:
    return None
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, lease_seconds)
    try:
      warning = lock.try_acquire()
      if warning:
        print(warning, flush=True)
    except WorkdirBusy as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(refused) and error is None:
      error = WorkdirBusy(f'process 0 could not lock {workdir} (its log says why).')
  if error is not None:
    raise error
  return lock
