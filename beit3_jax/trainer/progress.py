"""A one-line training progress display: bar, rate, ETA and the latest scalars.

    step 120/1000 ▕██░░░░░░░░░░░░░░░░░░▏  12% | 3.4 step/s | ETA 4m19s | loss 3.2100 lr 1.000e-03

On a terminal the line is redrawn in place with '\\r'. Elsewhere (CI, log files) a full line is
printed at most every `every_seconds`, and always at the last step, so logs stay short.

Typical use::

    progress = Progress(config.total_steps, start_step=restored_step,
                        enabled=jax.process_index() == 0)
    for step in range(restored_step + 1, config.total_steps + 1):
      ...
      progress.update(step, loss=loss, lr=lr)
    progress.close()
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, TextIO

_TTY_REDRAW_SECONDS = 0.1


def format_duration(seconds: float | None) -> str:
  """A duration in seconds as '12s', '4m18s' or '1h02m' (to whole seconds); '--' if unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return '--'
  total = int(round(seconds))
  if total < 60:
    return f'{total}s'
  if total < 3600:
    return f'{total // 60}m{total % 60:02d}s'
  return f'{total // 3600}h{total % 3600 // 60:02d}m'


def format_scalar(value: Any) -> str:
  """A metric for display: strings and ints as they are, floats with 4 decimals when 0.01 <= |x| < 10^4,
  otherwise in scientific notation with 4 significant digits ('1.000e-03')."""
  if isinstance(value, (bool, str)):
    return str(value)
  dtype_kind = getattr(getattr(value, 'dtype', None), 'kind', None)
  if isinstance(value, int) or dtype_kind in ('i', 'u'):
    return str(int(value))
  x = float(value)
  if x == 0 or not math.isfinite(x):
    return f'{x:g}'
  if 1e-2 <= abs(x) < 1e4:
    return f'{x:.4f}'
  return f'{x:.3e}'


def format_rate(steps_per_second: float | None) -> str:
  """'3.4 step/s', or '2.5 s/step' below one step a second; '-- step/s' if unknown."""
  if not steps_per_second or not math.isfinite(steps_per_second):
    return '-- step/s'
  if steps_per_second >= 1:
    return f'{steps_per_second:.1f} step/s'
  return f'{1 / steps_per_second:.1f} s/step'


def format_bar(fraction: float, width: int) -> str:
  """A bar of `width` cells, `fraction` (clipped to [0, 1]) of them full."""
  filled = int(round(min(max(fraction, 0.0), 1.0) * width))
  return '▕' + '█' * filled + '░' * (width - filled) + '▏'


def _is_tty(stream: TextIO) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class Progress:
  """Shows training progress on `stream`.

  Args:
    total_steps: the step number the run ends at.
    start_step: the step the run (re)started from; rate and ETA count only steps after it.
    every_seconds: on a non-terminal stream, the least wall time between printed lines (s).
    stream: where to write (default sys.stdout).
    enabled: False makes every method a no-op (for processes other than jax process 0).
    clock: returns the time in seconds (default time.perf_counter; tests pass a fake clock).
    tty: redraw one line in place; None asks `stream.isatty()`.
    bar_width: the bar's width in characters.

  The clock starts when the Progress is made, so the first steps' rate includes compilation.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0, every_seconds: float = 10.0,
               stream: TextIO | None = None, enabled: bool = True,
               clock: Callable[[], float] = time.perf_counter, tty: bool | None = None,
               bar_width: int = 20):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.every_seconds = every_seconds
    self.stream = sys.stdout if stream is None else stream
    self.enabled = enabled
    self.bar_width = bar_width
    self._clock = clock
    self._tty = _is_tty(self.stream) if tty is None else tty
    self._start_time = clock()
    self._last_shown_time: float | None = None
    self._pending: str | None = None
    self._drawn_width = 0

  def line(self, step: int, now: float, **scalars: Any) -> str:
    """The progress line for `step` at clock time `now` (s)."""
    fraction = step / self.total_steps if self.total_steps > 0 else 1.0
    rate = self.steps_per_second(step, now)
    eta = (self.total_steps - step) / rate if rate else None
    parts = [f'step {step}/{self.total_steps} {format_bar(fraction, self.bar_width)} '
             f'{int(min(max(fraction, 0.0), 1.0) * 100):3d}%',
             format_rate(rate), f'ETA {format_duration(eta)}']
    if scalars:
      parts.append(' '.join(f'{k} {format_scalar(v)}' for k, v in scalars.items()))
    return ' | '.join(parts)

  def steps_per_second(self, step: int, now: float) -> float | None:
    """Steps done since `start_step` over the wall time since the start (steps/s), or None."""
    elapsed = now - self._start_time
    done = step - self.start_step
    return done / elapsed if done > 0 and elapsed > 0 else None

  def update(self, step: int, **scalars: Any) -> None:
    """Records `step` and its scalars; shows them if enough time has passed or at the last step."""
    if not self.enabled:
      return
    now = self._clock()
    self._pending = self.line(step, now, **scalars)
    interval = _TTY_REDRAW_SECONDS if self._tty else self.every_seconds
    due = self._last_shown_time is None or now - self._last_shown_time >= interval
    if due or step >= self.total_steps:
      self._show()
      self._last_shown_time = now

  def _show(self) -> None:
    text = self._pending
    self._pending = None
    if self._tty:
      padding = ' ' * max(self._drawn_width - len(text), 0)
      self.stream.write('\r' + text + padding)
      self._drawn_width = len(text)
    else:
      self.stream.write(text + '\n')
    self.stream.flush()

  def close(self) -> None:
    """Shows the latest update if it was held back, and ends the line on a terminal."""
    if not self.enabled:
      return
    if self._pending is not None:
      self._show()
    if self._tty and self._drawn_width:
      self.stream.write('\n')
      self.stream.flush()
      self._drawn_width = 0

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
