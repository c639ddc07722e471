"""Whole pretraining runs through `python -m beit3_jax.main`, in fresh processes.

- Resume: 10 steps straight equal 5 steps, then a fresh process resuming from the workdir
  (params, optimizer, step, RNG and data position), then 5 more: bitwise on CPU.
- A checkpoint written on mesh (2, 2, 2) restores on (8, 1, 1) and training continues.
- Two processes of 4 CPU devices (jax.distributed on localhost) give the losses of one
  process with 8 devices.

All runs share one tiny setup: a small build of the built-in data (32 px), a random visual
tokenizer saved as a params directory, a 1-layer model; compiled programs are shared through
a persistent compilation cache.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_fixtures as fx
from beit3_jax import params_io
from beit3_jax.data.builtin import prepare_builtin
from beit3_jax.tokenizers import abstract_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
from beit3_jax.models import get_config as model_config
from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.defaults import pretrain_config


def get_config(arg=None):
  config = pretrain_config()
  config.total_steps = 10
  config.checkpoint_every = 5
  config.log_every = 1
  config.eval_every = 0
  config.mesh_shape = (2, 2, 2)
  config.model = model_config('base', embed_dim=48, depth=1, num_heads=4, mlp_dim=96,
                              img_size=32, patch_size=8, vocab_size=128,
                              max_text_positions=24, drop_path_rate=0.1)
  config.tokenizer.path = {tokenizer!r}
  config.data.data_dir = {data_dir!r}
  config.data.image = {images!r}
  config.data.pair = {images!r}
  config.data.text = {text!r}
  config.data.spm_path = {spm!r}
  config.data.fields = {{'image': {{}}, 'text': {{}}, 'pair': {{}}}}
  config.data.text_len = 12
  config.data.min_mask_block = 2
  config.data.read_threads = 1
  config.batch_size.image = 8
  config.batch_size.text = 8
  config.batch_size.pair = 8
  config.optimizer.warmup_steps = 2
  return config
'''


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  data = prepare_builtin(str(root / 'data'), image_size=32,
                         num_examples={'train': 48, 'validation': 8, 'test': 0}, verbose=False)
  tok_params = fx.tokenizer_params()
  _, stats = abstract_variables(fx.tokenizer_config())
  stats = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), stats)
  tokenizer = params_io.save_params(root / 'tokenizer', tok_params, fx.tokenizer_config(),
                                    kind='vqkd', extra={'vq_stats': stats})
  config = root / 'tiny.py'
  config.write_text(CONFIG.format(tokenizer=str(tokenizer), data_dir=str(root / 'data'),
                                  images=data.names['images'], text=data.names['text'],
                                  spm=data.spm_path))
  return {'root': root, 'config': str(config), 'cache': str(root / 'xla_cache')}


# Pod runs make their batches in data worker processes; the fault tests run so too.
WORKERS = ('--config.data.workers=2',)


def _run(setup, workdir, *flags, devices=8, env_extra=None, check=True, new_session=False):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices),
             JAX_COMPILATION_CACHE_DIR=setup['cache'],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
             JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=REPO, **(env_extra or {}))
  cmd = [sys.executable, '-m', 'beit3_jax.main', f'--config={setup["config"]}',
         f'--workdir={workdir}', *flags]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
                        start_new_session=new_session)
  if check and proc.returncode:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return proc


def _losses(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {l['step']: l['loss'] for l in lines if 'loss' in l}


def _params(workdir):
  return jax.tree.leaves(params_io.load_training_params(workdir)[0])


@pytest.fixture(scope='module')
def straight(setup):
  workdir = setup['root'] / 'straight'
  _run(setup, workdir)
  return workdir


@pytest.fixture(scope='module')
def interrupted(setup):
  """A run stopped after step 5 (its checkpoint), copied before anything resumes it."""
  workdir = setup['root'] / 'interrupted'
  out = _run(setup, workdir, '--config.stop_at_step=5')
  assert 'Stopping after step 5' in out.stdout
  return workdir


def test_resume_in_a_fresh_process_is_bitwise(setup, straight, interrupted):
  workdir = setup['root'] / 'resumed'
  shutil.copytree(interrupted, workdir)
  out = _run(setup, workdir)
  assert 'resumed from' in out.stdout and 'at step 5' in out.stdout
  a, b = _losses(straight), _losses(workdir)
  assert sorted(a) == sorted(b) == list(range(1, 11))
  for step in range(1, 11):
    assert a[step] == b[step], (step, a[step], b[step])
  for x, y in zip(_params(straight), _params(workdir)):
    np.testing.assert_array_equal(x, y)


def test_compilation_cache_dir_keeps_the_compiled_step(setup, tmp_path):
  """A job started again with the same compilation_cache_dir loads its train step from there."""
  cache = tmp_path / 'compiled'
  times = []
  for run in ('first', 'again'):
    out = _run(setup, tmp_path / run, f'--config.compilation_cache_dir={cache}',
               '--config.total_steps=3', '--config.eval_every=0')
    found = re.search(r'Compiled the train step in ([\d.]+) s \(compilation cache: (.+)\)',
                      out.stdout)
    assert found and found.group(2) == str(cache), out.stdout[-2000:]
    times.append(float(found.group(1)))
    assert any(cache.iterdir())
  assert times[1] < times[0], times


def test_checkpoint_from_mesh_222_restores_on_811(setup, straight, interrupted):
  workdir = setup['root'] / 'remeshed'
  shutil.copytree(interrupted, workdir)
  out = _run(setup, workdir, '--config.mesh_shape=(8,1,1)')
  assert "Resuming with changed mesh_shape" in out.stdout and 'at step 5' in out.stdout
  assert "'data': 8" in out.stdout
  a, b = _losses(straight), _losses(workdir)
  for step in range(6, 11):
    assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
  assert os.path.exists(os.path.join(workdir, 'config_history.jsonl'))


def test_other_config_changes_are_refused_on_resume(setup, interrupted):
  workdir = setup['root'] / 'refused'
  shutil.copytree(interrupted, workdir)
  out = _run(setup, workdir, '--config.optimizer.lr=0.5', check=False)
  assert out.returncode != 0 and 'optimizer.lr' in (out.stdout + out.stderr)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(setup, straight):
  workdir = setup['root'] / 'two_processes'
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4',
             JAX_COMPILATION_CACHE_DIR=setup['cache'], JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
             JAX_NUM_PROCESSES='2')
  cmd = [sys.executable, '-m', 'beit3_jax.main', f'--config={setup["config"]}',
         f'--workdir={workdir}']
  procs = [subprocess.Popen(cmd, env=dict(env, JAX_PROCESS_ID=str(i)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert 'over 2 process(es)' in outs[0]
  a, b = _losses(straight), _losses(workdir)
  assert sorted(b) == list(range(1, 11))
  for step in range(1, 11):
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
