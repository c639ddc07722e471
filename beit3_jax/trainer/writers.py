"""Metric writers: one JSON line per write in `metrics.jsonl`, plus TensorBoard scalars.

`MetricWriter(workdir)` appends to `<workdir>/metrics.jsonl` and writes TensorBoard event files
under `<workdir>/tensorboard/`. Each `write(step, metrics)` call adds one line::

    {"step": 120, "train/loss": 3.21, "train/lr": 0.001, "train/skipped": null}

Every line is strict JSON (RFC 8259, `json.dumps(..., allow_nan=False)`): the non-finite floats
NaN, +inf and -inf, which JSON has no numbers for, are written as the strings "nan", "inf" and
"-inf", and `read_metrics` turns them back into floats. Metric values are numbers, so these
strings are the only strings a line holds. `None` is written as `null` and left out of
TensorBoard.

The TensorBoard events go through the `tensorboard` package's record writer and protos, written
synchronously to a local file, so TensorFlow is never imported (the package's `EventFileWriter`
opens its file through `tensorboard.compat.tf`, which imports TensorFlow when it is installed).
Only process 0 of a multi-host run should write: pass `enabled=(jax.process_index() == 0)`.

Typical use::

    with MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
      writer.write_text(0, 'config', config.to_json_best_effort(indent=2))
      writer.write(step, {'loss': loss, 'lr': lr}, prefix='train')
      writer.write_image(step, 'captioning/examples', showcase.grid_image(examples))

(`write_image` takes uint8 pixels; `beit3_jax.tasks.showcase` draws examples with their
predictions into one.)
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import socket
import tempfile
import time
from typing import Any, Mapping

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'

_STR_TO_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}
_event_file_ids = itertools.count()


def to_python_scalar(key: str, value: Any) -> bool | int | float | None:
  """A metric value (Python, NumPy or JAX scalar) as a Python bool, int, float or None.

  Raises:
    ValueError: naming `key`, for arrays with more than one element, 1-element arrays that are
      not 0-d, strings, complex numbers and other non-numeric values.
  """
  if value is None or isinstance(value, (bool, int, float)):
    return value
  try:
    array = np.asarray(value)
  except Exception as e:  # e.g. a jax.Array on a non-addressable device
    raise ValueError(f'Metric {key!r}: cannot read {type(value).__name__} as a scalar') from e
  if array.ndim != 0 or array.dtype.kind not in 'biuf':
    raise ValueError(f'Metric {key!r} must be a real scalar, got {type(value).__name__} with '
                     f'shape {array.shape} and dtype {array.dtype}')
  return array.item()


def _json_value(value: bool | int | float | None) -> bool | int | float | str | None:
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def _from_json_value(value: Any) -> Any:
  if isinstance(value, str) and value in _STR_TO_NON_FINITE:
    return _STR_TO_NON_FINITE[value]
  return value


def encode_metrics_line(step: int, metrics: Mapping[str, bool | int | float | None]) -> str:
  """One `metrics.jsonl` line (without the newline) for already-converted Python scalars."""
  record = {'step': int(step), **{k: _json_value(v) for k, v in metrics.items()}}
  return json.dumps(record, allow_nan=False)


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file (or of a workdir holding one), in file order.

  The strings "nan", "inf" and "-inf" come back as floats; blank lines are skipped.
  """
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path, encoding='utf-8') as f:
    return [{k: _from_json_value(v) for k, v in json.loads(line).items()}
            for line in f if line.strip()]


def _scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  return summary_pb2.Summary.Value(tag=tag, simple_value=value)


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='text'))
  tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                  tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                  string_val=[text.encode('utf-8')])
  return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)


def _image_value(tag: str, image) -> summary_pb2.Summary.Value:
  """A TensorBoard image summary of uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels."""
  from PIL import Image
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[:, :, None]
  if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] not in (1, 3, 4) or 0 in x.shape:
    raise ValueError(f'Image {tag!r} must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), '
                     f'got {x.dtype} with shape {x.shape}')
  buffer = io.BytesIO()
  Image.fromarray(x[:, :, 0] if x.shape[-1] == 1 else x).save(buffer, format='PNG')
  encoded = summary_pb2.Summary.Image(height=x.shape[0], width=x.shape[1],
                                      colorspace=x.shape[-1],
                                      encoded_image_string=buffer.getvalue())
  return summary_pb2.Summary.Value(tag=tag, image=encoded)


class _EventFile:
  """A TensorBoard event file (TFRecord of `Event` protos), written synchronously."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
            f'{os.getpid()}.{next(_event_file_ids)}')
    self.path = os.path.join(logdir, name)
    self._records = RecordWriter(open(self.path, 'wb'))
    self._add(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self.flush()

  def _add(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def add_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    summary = summary_pb2.Summary(value=values)
    self._add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class MetricWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and to TensorBoard.

  Args:
    workdir: the run's directory, created if missing. A URL (gs://...) works too: the files are
      written in a local staging directory and copied there after every write (an existing
      remote metrics.jsonl is fetched first, so a resumed run keeps its lines).
    enabled: False makes every method a no-op (for processes other than jax process 0).
    tensorboard: also write TensorBoard event files under `<workdir>/tensorboard/`.

  A resumed run appends to the existing `metrics.jsonl` and starts a new event file next to the
  old ones (TensorBoard reads them as one run). Each `write` ends with a flush of both files, a
  write() system call each, so a crash loses nothing that was written.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir = str(workdir)
    self.enabled = enabled
    self._closed = False
    self._jsonl = None
    self._events: _EventFile | None = None
    self._remote = self.workdir if '://' in self.workdir else None
    if not enabled:
      return
    local = tempfile.mkdtemp(prefix='beit3_jax_metrics_') if self._remote else self.workdir
    os.makedirs(local, exist_ok=True)
    self._local = local
    if self._remote:
      remote_metrics = epath.Path(self._remote) / METRICS_FILE
      if remote_metrics.exists():
        with open(os.path.join(local, METRICS_FILE), 'wb') as f:
          f.write(remote_metrics.read_bytes())
    self._jsonl = open(os.path.join(local, METRICS_FILE), 'a', encoding='utf-8')
    if tensorboard:
      self._events = _EventFile(os.path.join(local, TENSORBOARD_DIR))

  def _sync(self) -> None:
    """Copies the local files to a remote workdir (no-op for a local one)."""
    if not self._remote:
      return
    for root, _, files in os.walk(self._local):
      for name in files:
        local = os.path.join(root, name)
        target = epath.Path(self._remote) / os.path.relpath(local, self._local)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local, 'rb') as f:
          target.write_bytes(f.read())

  @property
  def metrics_path(self) -> str:
    if self._remote:
      return f'{self._remote.rstrip("/")}/{METRICS_FILE}'
    return os.path.join(self.workdir, METRICS_FILE)

  @property
  def event_file_path(self) -> str | None:
    """The TensorBoard event file this writer writes, or None (disabled, or no TensorBoard)."""
    return self._events.path if self._events else None

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError('MetricWriter is closed')

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str | None = None) -> None:
    """Appends one `metrics.jsonl` line and one TensorBoard summary for `step`.

    Args:
      step: the training step (an int).
      metrics: name -> scalar (Python, NumPy or JAX; 0-d arrays included) or None.
      prefix: when given, each name is written as `prefix/name`.

    Raises:
      ValueError: for a non-scalar value (naming its key), a key that comes out as 'step', or
        a closed writer. Nothing is written then.
    """
    if not self.enabled:
      return
    self._check_open()
    values = {}
    for key, value in metrics.items():
      name = f'{prefix}/{key}' if prefix else key
      if name == 'step':
        raise ValueError("Metric name 'step' is reserved for the step number")
      values[name] = to_python_scalar(name, value)
    step = int(step)
    self._jsonl.write(encode_metrics_line(step, values) + '\n')
    self._jsonl.flush()
    if self._events:
      scalars = [_scalar_value(k, float(v)) for k, v in values.items() if v is not None]
      if scalars:
        self._events.add_summary(step, scalars)
        self._events.flush()
    self._sync()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Writes `text` (markdown, e.g. the run's config) to TensorBoard's Text tab under `tag`."""
    if not self.enabled:
      return
    self._check_open()
    if self._events:
      self._events.add_summary(int(step), [_text_value(tag, text)])
      self._events.flush()

  def write_image(self, step: int, tag: str, image) -> None:
    """Writes an image to TensorBoard's Images tab under `tag` (a PNG `Summary.Image`).

    Args:
      step: the training step.
      tag: e.g. 'captioning/examples'.
      image: uint8 pixels (H, W, 3) (RGB), (H, W, 4) (RGBA), or (H, W) / (H, W, 1) (grey);
        e.g. `beit3_jax.tasks.showcase.grid_image(...)`.

    Raises:
      ValueError: another dtype or shape (naming `tag`), or a closed writer.
    """
    if not self.enabled:
      return
    self._check_open()
    value = _image_value(tag, image)
    if self._events:
      self._events.add_summary(int(step), [value])
      self._events.flush()
      self._sync()

  def flush(self) -> None:
    """Flushes both files to the operating system (every write already does)."""
    if not self.enabled or self._closed:
      return
    self._jsonl.flush()
    if self._events:
      self._events.flush()

  def close(self, sync: bool = True) -> None:
    """Flushes and closes both files and copies them to a remote workdir; calling it again does
    nothing. `sync=False` (the remote workdir cannot be reached) leaves them in the local
    folder and says where."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    self._jsonl.close()
    if self._events:
      self._events.close()
    if sync:
      self._sync()
    elif self._remote:
      print(f'The metrics not yet copied to {self._remote} are in {self._local}.', flush=True)

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
