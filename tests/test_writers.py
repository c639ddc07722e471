"""The metric writers (metrics.jsonl, TensorBoard events) and the progress display."""

import io
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2

from beit3_jax.tasks import showcase
from beit3_jax.trainer import progress as progress_lib
from beit3_jax.trainer import writers
from beit3_jax.trainer.progress import Progress, format_duration, format_scalar
from beit3_jax.trainer.writers import MetricWriter, read_metrics


def _strict_json_lines(path):
  def reject(constant):
    raise AssertionError(f'non-RFC JSON constant {constant}')
  with open(path) as f:
    return [json.loads(line, parse_constant=reject) for line in f]


def _load_events(workdir):
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, writers.TENSORBOARD_DIR))
  acc.Reload()
  return acc


def test_write_and_read_back(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {'loss': 3.5, 'count': 7, 'lr': np.float32(0.25), 'acc': jnp.float32(0.5),
                     'tokens': jnp.asarray(12), 'skipped': None})
    writer.write(2, {'loss': np.asarray(2.0)})
  lines = _strict_json_lines(tmp_path / 'metrics.jsonl')
  assert lines == read_metrics(str(tmp_path / 'metrics.jsonl')) == read_metrics(str(tmp_path))
  assert lines == [
      {'step': 1, 'loss': 3.5, 'count': 7, 'lr': 0.25, 'acc': 0.5, 'tokens': 12, 'skipped': None},
      {'step': 2, 'loss': 2.0}]
  assert isinstance(lines[0]['tokens'], int) and isinstance(lines[0]['lr'], float)


def test_prefix(tmp_path):
  with MetricWriter(str(tmp_path), tensorboard=False) as writer:
    writer.write(5, {'loss': 1.0, 'acc': 0.5}, prefix='eval')
  assert read_metrics(str(tmp_path)) == [{'step': 5, 'eval/loss': 1.0, 'eval/acc': 0.5}]
  assert not os.path.exists(tmp_path / writers.TENSORBOARD_DIR)


def test_resumed_run_appends(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {'loss': 3.0})
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(2, {'loss': 2.0})
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]
  assert len(os.listdir(tmp_path / writers.TENSORBOARD_DIR)) == 2
  assert [(e.step, e.value) for e in _load_events(str(tmp_path)).Scalars('loss')] == [
      (1, 3.0), (2, 2.0)]


def test_non_finite_values_are_strings_in_strict_json(tmp_path):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(3, {'a': float('nan'), 'b': np.inf, 'c': jnp.float32(-jnp.inf), 'd': 1.0})
  with open(tmp_path / 'metrics.jsonl') as f:
    assert json.loads(f.read()) == {'step': 3, 'a': 'nan', 'b': 'inf', 'c': '-inf', 'd': 1.0}
  [record] = read_metrics(str(tmp_path))
  assert math.isnan(record['a']) and record['b'] == math.inf and record['c'] == -math.inf
  assert math.isnan(_load_events(str(tmp_path)).Scalars('a')[0].value)


@pytest.mark.parametrize('value', [np.zeros(3), np.zeros((1,)), jnp.ones((2, 2)), 'high',
                                   1 + 2j, [1.0]])
def test_non_scalar_raises_naming_the_key(tmp_path, value):
  with MetricWriter(str(tmp_path)) as writer:
    writer.write(1, {'fine': 1.0})
    with pytest.raises(ValueError, match='train/bad'):
      writer.write(2, {'ok': 1.0, 'bad': value}, prefix='train')
  assert read_metrics(str(tmp_path)) == [{'step': 1, 'fine': 1.0}]


def test_step_key_is_reserved(tmp_path):
  with MetricWriter(str(tmp_path)) as writer, pytest.raises(ValueError, match='step'):
    writer.write(1, {'step': 4})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  writer = MetricWriter(str(workdir), enabled=False)
  writer.write(1, {'loss': 1.0})
  writer.write(2, {'bad': np.zeros(3)})
  writer.write_text(0, 'config', 'x')
  writer.flush()
  writer.close()
  writer.close()
  assert not workdir.exists()


def test_close_is_idempotent_and_write_after_close_raises(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, {'loss': 1.0})
  writer.close()
  writer.close()
  writer.flush()
  with pytest.raises(ValueError, match='closed'):
    writer.write(2, {'loss': 1.0})


def test_tensorboard_scalars_and_text(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, {'loss': 4.0 - step / 10, 'lr': 1e-3 * step, 'tokens': step * 100,
                        'skipped': None}, prefix='train')
  writer.write_text(0, 'config', '# Config\nlr: 0.001')
  acc = _load_events(str(tmp_path))  # before close: every write is flushed
  assert sorted(acc.Tags()['scalars']) == ['train/loss', 'train/lr', 'train/tokens']
  loss = acc.Scalars('train/loss')
  assert [e.step for e in loss] == [10, 20, 30]
  np.testing.assert_allclose([e.value for e in loss], [3.0, 2.0, 1.0])
  np.testing.assert_allclose([e.value for e in acc.Scalars('train/lr')], [0.01, 0.02, 0.03],
                             rtol=1e-6)
  assert [e.value for e in acc.Scalars('train/tokens')] == [1000, 2000, 3000]
  [text] = acc.Tensors('config')
  assert text.step == 0 and text.tensor_proto.string_val == [b'# Config\nlr: 0.001']
  writer.close()
  assert len(os.listdir(tmp_path / writers.TENSORBOARD_DIR)) == 1


def test_tensorboard_image_of_examples(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 24, 32, 3), dtype=np.uint8)
  grid = showcase.grid_image(showcase.compare(images, ['a dog', ['a cat', 'cat'], 'sky'],
                                              ['a dog', 'a bird', 'sea']), columns=2)
  grey = np.arange(60, dtype=np.uint8).reshape(6, 10)
  with MetricWriter(str(tmp_path)) as writer:
    writer.write_image(100, 'captioning/examples', grid)
    writer.write_image(200, 'captioning/examples', grid[:50])
    writer.write_image(200, 'grey', grey)
    with pytest.raises(ValueError, match="'bad'.*float32"):
      writer.write_image(1, 'bad', grid.astype(np.float32))
    with pytest.raises(ValueError, match="'bad'.*shape \\(4, 4, 2\\)"):
      writer.write_image(1, 'bad', np.zeros((4, 4, 2), np.uint8))
  acc = _load_events(str(tmp_path))
  assert sorted(acc.Tags()['images']) == ['captioning/examples', 'grey']
  first, second = acc.Images('captioning/examples')
  assert (first.step, first.height, first.width) == (100, *grid.shape[:2])
  assert (second.step, second.height, second.width) == (200, 50, grid.shape[1])
  decoded = np.asarray(Image.open(io.BytesIO(first.encoded_image_string)))
  assert decoded.dtype == np.uint8 and np.array_equal(decoded, grid)     # PNG: lossless
  [grey_event] = acc.Images('grey')
  assert np.array_equal(np.asarray(Image.open(io.BytesIO(grey_event.encoded_image_string))),
                        grey)
  # The summaries carry the colour space: RGB 3, grey 1.
  [name] = os.listdir(tmp_path / writers.TENSORBOARD_DIR)
  events = [event_pb2.Event.FromString(record) for record in event_file_loader.RawEventFileLoader(
      os.path.join(tmp_path, writers.TENSORBOARD_DIR, name)).Load()]
  spaces = {v.tag: v.image.colorspace for e in events for v in e.summary.value}
  assert spaces == {'captioning/examples': 3, 'grey': 1}


def test_writer_does_not_import_tensorflow(tmp_path):
  script = f"""
import importlib.abc, sys
class NoTF(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      raise AssertionError('imported ' + name)
sys.meta_path.insert(0, NoTF())
import numpy as np
import tensorboard
from beit3_jax.trainer.writers import MetricWriter
with MetricWriter({str(tmp_path)!r}) as w:
  w.write(1, {{'loss': 1.0}})
  w.write_text(0, 'config', 'text')
  w.write_image(0, 'image', np.zeros((2, 3, 3), np.uint8))
assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules)
"""
  subprocess.run([sys.executable, '-c', script], check=True, timeout=60,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert read_metrics(str(tmp_path)) == [{'step': 1, 'loss': 1.0}]


# Progress


class FakeClock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_format_duration():
  assert format_duration(12) == '12s'
  assert format_duration(0.4) == '0s'
  assert format_duration(258) == '4m18s'
  assert format_duration(59.6) == '1m00s'
  assert format_duration(3720) == '1h02m'
  assert format_duration(30 * 3600 + 5 * 60) == '30h05m'
  assert format_duration(None) == format_duration(math.inf) == format_duration(-1) == '--'


def test_format_scalar():
  assert format_scalar(3.21) == '3.2100'
  assert format_scalar(1e-3) == '1.000e-03'
  assert format_scalar(123456.0) == '1.235e+05'
  assert format_scalar(7) == format_scalar(np.int32(7)) == format_scalar(jnp.asarray(7)) == '7'
  assert format_scalar(jnp.float32(0.5)) == '0.5000'
  assert format_scalar(0.0) == '0'
  assert format_scalar(float('nan')) == 'nan'


def test_progress_non_tty_lines_rate_eta():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(1000, stream=out, clock=clock, every_seconds=10)
  for step in range(1, 1001):
    clock.now = step / 4.0  # 4 steps/s
    progress.update(step, loss=3.21, lr=1e-3)
  progress.close()
  lines = out.getvalue().splitlines()
  assert '\r' not in out.getvalue()
  assert len(lines) == 26  # steps 1, 41, 81, ..., 961 (every 10 s), and the last step
  assert lines[0].startswith('step 1/1000 ▕')
  assert lines[1].startswith('step 41/1000 ')
  assert ' 4.0 step/s ' in lines[1] and 'ETA 4m00s' in lines[1]  # 959 steps at 4 steps/s
  assert lines[1].endswith('| loss 3.2100 lr 1.000e-03')
  assert lines[-1].startswith('step 1000/1000 ▕' + '█' * 20 + '▏ 100% |')
  assert 'ETA 0s' in lines[-1]


def test_progress_respects_start_step():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(100, start_step=50, stream=out, clock=clock)
  clock.now = 5.0
  progress.update(60)
  bar = '▕' + '█' * 12 + '░' * 8 + '▏'
  assert out.getvalue() == f'step 60/100 {bar}  60% | 2.0 step/s | ETA 20s\n'


def test_progress_slow_rate_and_unknown_eta():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(10, start_step=2, stream=out, clock=clock)
  progress.update(2, loss=1.0)
  assert '-- step/s' in out.getvalue() and 'ETA --' in out.getvalue()
  clock.now = 30.0
  progress.update(3)
  progress.close()
  assert '30.0 s/step' in out.getvalue().splitlines()[-1]


def test_progress_close_shows_held_back_update():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(100, stream=out, clock=clock, every_seconds=10)
  progress.update(1)
  clock.now = 1.0
  progress.update(2)
  assert out.getvalue().count('\n') == 1
  progress.close()
  progress.close()
  assert out.getvalue().splitlines()[-1].startswith('step 2/100 ')


def test_progress_tty_redraws_one_line():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(10, stream=out, clock=clock, tty=True)
  for step in range(1, 11):
    clock.now = float(step)
    progress.update(step, loss=10.0 / step)
  assert '\n' not in out.getvalue()
  assert out.getvalue().count('\r') == 10
  progress.close()
  assert out.getvalue().endswith('\n') and out.getvalue().count('\n') == 1
  assert out.getvalue().rsplit('\r', 1)[-1].startswith('step 10/10 ')


def test_progress_tty_throttles_and_pads():
  clock, out = FakeClock(), io.StringIO()
  progress = Progress(1000, stream=out, clock=clock, tty=True)
  progress.update(1, loss=1.0, extra=2.0)
  clock.now = progress_lib._TTY_REDRAW_SECONDS / 2
  progress.update(2)
  assert out.getvalue().count('\r') == 1
  clock.now = 1.0
  progress.update(3)
  first, second = out.getvalue().split('\r')[1:]
  assert len(second) == len(first) and second.rstrip(' ').endswith('ETA 5m32s')  # 997 steps at 3 steps/s


def test_disabled_progress_prints_nothing():
  out = io.StringIO()
  progress = Progress(10, stream=out, enabled=False)
  progress.update(10, loss=1.0)
  progress.close()
  assert out.getvalue() == ''
