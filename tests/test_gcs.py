"""gs:// paths against a local Cloud Storage server (tests/gcs_server.py): the tiny pretraining
of test_pretrain_runs with its workdir and data on gs://, killed and resumed; a fine-tuning run
with init_from and its workdir on gs://, killed and resumed; training checkpoints (with the data
iterator), TFDS data read through a local copy, params directories, the convert CLI and predict.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from PIL import Image

from beit3_jax import convert, params_io, predict, torch_files
from beit3_jax.data import local_files, paths, tfds_sources
from beit3_jax.models import abstract_params
from beit3_jax.trainer import checkpoints
from conftest import tiny_config
from test_pretrain_runs import WORKERS, _params, _run, setup, straight  # noqa: F401

pytest_plugins = ['gcs_server']   # the `gcs` fixture
pytestmark = pytest.mark.faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(cfg, seed=0):
  """The tiny model's params as float32 numpy arrays drawn from N(0, 0.02) (no init compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.02).astype(a.dtype),
                      abstract_params(cfg, boxed=False))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def upload(local_dir, url):
  """Copies a local folder's files to `url` (same relative paths)."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), 'rb') as f:
        (epath.Path(url) / rel).write_bytes(f.read())


class Position:
  """A stand-in for a data mixture: restoring a checkpoint hands it the saved data state."""

  def __init__(self, state=None):
    self.state = state

  def set_state(self, state):
    self.state = state


@pytest.fixture(scope='module')
def cfg():
  return tiny_config()


@pytest.fixture(scope='module')
def params(cfg):
  return random_params(cfg)


def train_state_items(params, step):
  """A TrainState's checkpoint items: params, adamw's state (nested namedtuples), step, rng."""
  params = jax.tree.map(jnp.asarray, params)
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + step if x.dtype == jnp.float32 else x, opt_state)
  return {'step': jnp.int32(step), 'params': params, 'opt_state': opt_state, 'extra': {},
          'rng': jax.random.key_data(jax.random.key(step))}


def test_local_server_keeps_generations_like_cloud_storage(gcs):
  """What Orbax's OCDBT format relies on (tests/gcs_server.py adds it to the emulator): reads
  report the object's generation, conditional reads and writes honour it."""
  import tensorstore as ts
  kv = ts.KvStore.open({'driver': 'gcs', 'bucket': gcs.url[len('gs://'):],
                        'path': 'generations/'}).result()
  first = kv.write('manifest', b'v1').result().generation
  read = kv.read('manifest').result()
  assert read.value == b'v1' and read.stamp.generation == first   # unpatched: generation 0
  assert kv.read('manifest', if_not_equal=first).result().state == 'unspecified'   # 304
  second = kv.write('manifest', b'v2', if_equal=first).result().generation
  assert second not in (b'', first)
  stale = kv.write('manifest', b'v3', if_equal=first).result()   # 412; unpatched: overwrites
  assert stale.generation == b'' and kv.read('manifest').result().value == b'v2'


def test_checkpoints_with_the_data_position_save_and_resume_on_gcs(gcs, params):
  # A TrainState of the tiny model is about 280 arrays: against the emulator without
  # tests/gcs_server.py's patch, most runs of these saves fail with "Error reading
  # .../manifest.ocdbt: Malformed StorageGeneration" (see docs/cloud_storage.md).
  workdir = gcs.path('ckpt_run')
  last = 4
  saver = checkpoints.Checkpointer(workdir, every=1, keep=2, async_save=True)
  for step in range(1, last + 1):
    assert saver.save(step, train_state_items(params, step), {'epoch': 0, 'next': step})
  saver.close()
  steps = epath.Path(workdir) / 'checkpoints'
  assert (steps / str(last) / 'state').exists() and (steps / str(last) / 'data').exists()
  assert not (steps / str(last - 2)).exists()   # keep=2 deleted it

  resumed = checkpoints.Checkpointer(workdir, every=1, keep=2)   # a restarted run
  assert resumed.all_steps() == [last - 1, last]
  want = train_state_items(params, last)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          want)
  position = Position()
  got = resumed.restore(last, abstract, position)
  resumed.close()
  assert_trees_equal(got, want)
  assert position.state == {'epoch': 0, 'next': last}

  # init_from the gs:// workdir: its newest checkpoint's params.
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  loaded, what = checkpoints.load_init_params(workdir, params, shardings)
  assert_trees_equal(loaded, params)
  assert f'checkpoints/{last}' in what


def test_tfds_data_on_gcs_is_read_through_a_local_copy(gcs, tmp_path, monkeypatch, capsys):
  (tmp_path / 'train.txt').write_text(''.join(f'sentence {i}\n' for i in range(50)))
  (tmp_path / 'val.txt').write_text('held out\n')
  local_files.build_text('gs_corpus', {'train': [str(tmp_path / 'train.txt')],
                                       'validation': [str(tmp_path / 'val.txt')]},
                         data_dir=str(tmp_path / 'data'))
  upload(tmp_path / 'data' / 'tfds', gcs.path('data', 'tfds'))
  cache = tmp_path / 'cache'
  monkeypatch.setenv(paths.REMOTE_CACHE_ENV_VAR, str(cache))
  tfds_dir = paths.tfds_dir(gcs.path('data'))
  assert tfds_dir == gcs.path('data', 'tfds')

  source = tfds_sources.open_source('gs_corpus', 'train', tfds_dir)
  assert len(source) == 50 and source[7]['text'] == b'sentence 7'
  out = capsys.readouterr().out
  assert 'Copied' in out and 'MiB' in out and ' s ' in out, out
  copy = cache / 'gs' / 'beit3-test' / 'data' / 'tfds' / 'gs_corpus' / '1.0.0'
  files = sorted(p.name for p in copy.iterdir())
  assert 'dataset_info.json' in files
  assert any('train.array_record' in f for f in files)
  assert not any('validation.array_record' in f for f in files)   # only the split it reads

  tfds_sources.open_source('gs_corpus', 'train', tfds_dir)
  assert 'Reusing the local copy' in capsys.readouterr().out

  # A remote file rewritten (a new generation) is copied again.
  remote = epath.Path(tfds_dir) / 'gs_corpus' / '1.0.0' / 'features.json'
  remote.write_bytes(remote.read_bytes())
  tfds_sources.open_source('gs_corpus', 'train', tfds_dir)
  assert 'Copied 1 file(s)' in capsys.readouterr().out

  # Without the space for it, the message says what to do.
  monkeypatch.setattr(tfds_sources.shutil, 'disk_usage', lambda _: type('U', (), {'free': 1}))
  with pytest.raises(OSError, match=paths.REMOTE_CACHE_ENV_VAR):
    tfds_sources.open_source('gs_corpus', 'validation', tfds_dir)
  monkeypatch.undo()

  # 'off': ArrayRecord reads gs:// in place (one request per record).
  monkeypatch.setenv(paths.REMOTE_CACHE_ENV_VAR, 'off')
  in_place = tfds_sources.open_source('gs_corpus', 'validation', tfds_dir)
  assert in_place[0]['text'] == b'held out'


def test_params_io_convert_and_predict_on_gcs(gcs, cfg, params, tmp_path, capsys):
  flax_dir = gcs.path('models', 'tiny')
  params_io.save_params(flax_dir, params, cfg)
  assert_trees_equal(params_io.load_params(flax_dir), jax.tree.map(np.asarray, params))
  with pytest.raises(FileExistsError, match='overwrite'):
    params_io.save_params(flax_dir, params, cfg)
  params_io.save_params(flax_dir, params, cfg, overwrite=True)

  # init_from a params directory on gs://.
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  loaded, _ = checkpoints.load_init_params(flax_dir, params, shardings)
  assert_trees_equal(loaded, params)

  # The convert CLI: a torch file on gs:// -> a params directory on gs:// -> a torch file there.
  sd = convert.flax_to_torch(params, cfg)
  torch_files.save_state_dict(sd, str(tmp_path / 'in.safetensors'))
  torch_in = gcs.path('torch', 'in.safetensors')
  epath.Path(torch_in).write_bytes((tmp_path / 'in.safetensors').read_bytes())
  converted = gcs.path('models', 'converted')
  assert convert.main(['to-flax', torch_in, converted, '--config', flax_dir]) == 0
  assert_trees_equal(params_io.load_params(converted), jax.tree.map(np.asarray, params))
  back = gcs.path('torch', 'back.safetensors')
  assert convert.main(['to-torch', converted, back]) == 0
  assert f'to {back}' in capsys.readouterr().out
  (tmp_path / 'back.safetensors').write_bytes(epath.Path(back).read_bytes())
  got = torch_files.load_state_dict(str(tmp_path / 'back.safetensors'))
  assert set(got) == set(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)
  with pytest.raises(FileExistsError, match='overwrite'):
    convert.main(['to-torch', converted, back])

  # A subprocess reaches the server through `gcs.env`.
  run = subprocess.run(
      [sys.executable, '-m', 'beit3_jax.convert', 'to-torch', converted, back, '--overwrite'],
      cwd=REPO, env={**gcs.env, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
      timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f'to {back}' in run.stdout

  # predict: a params directory, an image folder and the output on gs://.
  rng = np.random.default_rng(0)
  for name in ('a.png', 'b.png'):
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / name)
    epath.Path(gcs.path('images', name)).write_bytes((tmp_path / name).read_bytes())
  output = gcs.path('predictions', 'embed.json')
  assert predict.main(['embed', converted, '--image', gcs.path('images'), '--output',
                       output]) == 0
  result = json.loads(epath.Path(output).read_text())
  assert result['image_files'] == [gcs.path('images', 'a.png'), gcs.path('images', 'b.png')]
  assert np.allclose(np.linalg.norm(np.asarray(result['image_features']), axis=-1), 1, atol=1e-5)


def _losses(workdir):
  """{step: loss} of a run's metrics.jsonl (local or gs://)."""
  lines = [json.loads(l) for l in (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return {l['step']: l['loss'] for l in lines if 'loss' in l}


def _kill_and_resume(setup, workdir, flags, env_extra):  # noqa: F811
  """Runs `flags` (with data workers) in `workdir` until SIGKILL after step 5 (checkpoints every
  3 steps), then again to the end; returns the rerun's output."""
  flags = [*WORKERS, *flags]
  killed = _run(setup, workdir, *flags, '--config.checkpoint_every=3',
                env_extra={**env_extra, 'BEIT3_JAX_FAULT': 'kill_after_step:5'}, check=False)
  assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
  assert 'kill_after_step:5' in killed.stderr
  rerun = _run(setup, workdir, *flags, '--config.checkpoint_every=3', env_extra=env_extra)
  resumed = re.search(r'at step (\d+)', rerun.stdout)
  assert resumed and int(resumed.group(1)) in (1, 3), rerun.stdout[-2000:]  # 3 unless its
  return rerun                                                              # save was cut


def test_pretraining_on_gcs_killed_and_resumed_ends_as_a_local_run(gcs, setup, straight,  # noqa: F811
                                                                   tmp_path):
  """Workdir and TFDS data dir on gs://; the data is read through its local copy."""
  upload(setup['root'] / 'data' / 'tfds', gcs.path('tiny_data', 'tfds'))
  workdir = gcs.path('tiny_pretraining')
  cache = tmp_path / 'remote_cache'
  rerun = _kill_and_resume(setup, workdir, [f'--config.data.data_dir={gcs.path("tiny_data")}'],
                           {paths.REMOTE_CACHE_ENV_VAR: str(cache)})
  assert 'Reusing the local copy' in rerun.stdout, rerun.stdout[-2000:]
  assert (cache / 'gs' / 'beit3-test' / 'tiny_data' / 'tfds').is_dir()
  a, b = _losses(straight), _losses(workdir)
  assert sorted(b) == list(range(1, 11)) and a[10] == b[10], (a, b)
  for x, y in zip(_params(straight), _params(workdir)):
    np.testing.assert_array_equal(x, y)
  assert not os.path.exists(os.path.join(REPO, 'gs:'))   # nothing written to a local 'gs:/'


FINETUNE_CONFIG = '''
from beit3_jax.defaults import finetune_config
from beit3_jax.models import get_config as model_config


def get_config(arg=None):
  config = finetune_config('classification')
  config.model = model_config('base', embed_dim=48, depth=1, num_heads=4, mlp_dim=96,
                              img_size=32, patch_size=8, vocab_size=128, max_text_positions=24)
  config.num_classes = 6
  config.data.data_dir = {data_dir!r}
  config.data.source = {images!r}
  config.data.read_threads = 1
  config.batch_size = 8
  config.mesh_shape = (2, 2, 2)
  config.total_steps = 8
  config.log_every = 1
  config.eval_every = 0
  config.optimizer.warmup_steps = 2
  return config
'''


def test_finetuning_from_gcs_killed_and_resumed_ends_as_a_local_run(gcs, setup, straight):  # noqa: F811
  """init_from a pretraining workdir on gs://, the fine-tuning workdir on gs:// too."""
  from beit3_jax.data.builtin import prepare_builtin
  data = prepare_builtin(str(setup['root'] / 'data'), image_size=32,
                         num_examples={'train': 48, 'validation': 8, 'test': 0}, verbose=False)
  config = setup['root'] / 'tiny_finetune.py'
  config.write_text(FINETUNE_CONFIG.format(data_dir=str(setup['root'] / 'data'),
                                           images=data.names['images']))
  tiny = dict(setup, config=str(config))
  local = setup['root'] / 'finetune_local'
  _run(tiny, local, f'--config.init_from={straight}')
  pretrained = gcs.path('pretrained')
  upload(straight, pretrained)
  workdir = gcs.path('finetune')
  _kill_and_resume(tiny, workdir, [f'--config.init_from={pretrained}'], {})
  a, b = _losses(local), _losses(workdir)
  assert sorted(b) == list(range(1, 9)) and a[8] == b[8], (a, b)
  for x, y in zip(_params(local), _params(workdir)):
    np.testing.assert_array_equal(x, y)


def test_unreachable_storage_stops_the_run_before_it_builds_anything(gcs, setup):  # noqa: F811
  import gcs_server
  nowhere = gcs_server.environment(f'http://localhost:{gcs_server._free_port()}')
  workdir = gcs.path('never_written')
  out = _run(setup, workdir, *WORKERS, env_extra=nowhere, check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert f'Error: --workdir={workdir}: cannot reach it' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr and 'Saved the config' not in out.stdout
  assert not epath.Path(workdir).exists()


def test_storage_lost_during_a_run_stops_it_and_the_rerun_resumes(gcs, setup, straight):  # noqa: F811
  """The server drops every request from the first one of step 6's checkpoint on (gcsfs and
  tensorstore retry for a while); once it is back, the rerun resumes from step 3."""
  workdir = gcs.path('storage_lost')
  gcs.outage(r'storage_lost(/|%2F)checkpoints(/|%2F)6')
  try:
    lost = _run(setup, workdir, *WORKERS, '--config.checkpoint_every=3', check=False)
  finally:
    gcs.outage(None)
  assert lost.returncode == 1, lost.stdout[-2000:] + lost.stderr[-2000:]
  assert f'Error: Lost the connection to {workdir} during the run' in lost.stderr, \
      lost.stderr[-2000:]
  rerun = _run(setup, workdir, *WORKERS, '--config.checkpoint_every=3')
  assert 'at step 3' in rerun.stdout, rerun.stdout[-2000:]
  a, b = _losses(straight), _losses(workdir)
  assert a[10] == b[10], (a, b)
  for x, y in zip(_params(straight), _params(workdir)):
    np.testing.assert_array_equal(x, y)


def test_a_sentencepiece_model_is_written_to_and_read_from_gcs(gcs, setup):  # noqa: F811
  from beit3_jax.data import text as text_lib
  local = (setup['root'] / 'data' / 'spm' / 'synthetic_world.spm').read_bytes()
  url = gcs.path('data', 'spm', 'model.spm')
  assert text_lib.save_spm(local, url) == url
  assert epath.Path(url).read_bytes() == local
  with pytest.raises(FileExistsError):
    text_lib.save_spm(local, url)
  assert text_lib.TextTokenizer.from_file(url).spm_size > 3
  assert not os.path.exists(os.path.join(REPO, 'gs:'))


def test_the_workdir_lock_on_gcs_refuses_a_second_run_and_is_taken_over_when_stale(gcs):
  import time

  from beit3_jax.trainer import workdir_lock
  workdir = gcs.path('locked_run')
  first = workdir_lock.WorkdirLock(workdir, 600)
  assert first.try_acquire() == ''
  with pytest.raises(workdir_lock.WorkdirBusy, match=f'pid {os.getpid()}'):
    workdir_lock.WorkdirLock(workdir, 600).try_acquire()
  first.release()
  assert not epath.Path(workdir, workdir_lock.LOCK_FILE).exists()

  expired = workdir_lock.WorkdirLock(workdir, 600, clock=lambda: time.time() - 3600)
  expired.try_acquire()   # renewed an hour ago as far as the lock file says
  taker = workdir_lock.WorkdirLock(workdir, 600)
  assert 'taking over the lock' in taker.try_acquire()
  expired.release()       # no longer its lock: left in place
  assert epath.Path(workdir, workdir_lock.LOCK_FILE).exists()
  taker.release()
  assert not epath.Path(workdir, workdir_lock.LOCK_FILE).exists()
