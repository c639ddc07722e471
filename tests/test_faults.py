"""Faults a long run meets, injected on purpose: preemption (SIGTERM), a kill in the middle of a
checkpoint save, damaged checkpoints, non-finite losses, a second run in the same workdir.
Each faulty run is resumed and must end bitwise equal to an uninterrupted run.

The runs are the tiny pretraining of test_pretrain_runs (10 steps), in fresh processes through
`python -m beit3_jax.main`, with two data worker processes as on a pod; faults at exact steps
come from `beit3_jax.trainer.fault_points`.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as fx
from beit3_jax import params_io, sharding
from beit3_jax.trainer import loop
from beit3_jax.trainer import step as step_lib
from beit3_jax.trainer import workdir_lock
from test_pretrain_runs import (REPO, WORKERS, _free_port, _losses, _params,  # noqa: F401
                                setup, straight)
from test_pretrain_runs import _run as _run_without_workers

pytestmark = pytest.mark.faults

# Every faulty run here makes its batches in WORKERS; the straight run they must equal has
# none, which also shows the workers change no batch.


def _run(setup, workdir, *flags, **kwargs):  # noqa: F811
  return _run_without_workers(setup, workdir, *WORKERS, *flags, **kwargs)


def _assert_resumed_equal(setup, workdir, straight, resumed_from):  # noqa: F811
  """Reruns `workdir`'s command; it must resume at `resumed_from` and end as `straight`."""
  out = _run(setup, workdir)
  assert f'at step {resumed_from}' in out.stdout, out.stdout[-2000:]
  a, b = _losses(straight), _losses(workdir)
  assert a[10] == b[10], (a, b)
  for x, y in zip(_params(straight), _params(workdir)):
    np.testing.assert_array_equal(x, y)
  return out


def _steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def _stopped_at_7(setup, name):  # noqa: F811
  """A run with checkpoints at steps 3, 6 and 7, stopped after step 7."""
  workdir = setup['root'] / name
  _run(setup, workdir, '--config.checkpoint_every=3', '--config.stop_at_step=7')
  assert _steps(workdir) == [3, 6, 7]
  return workdir


def test_sigterm_saves_the_step_and_the_rerun_is_bitwise(setup, straight):  # noqa: F811
  workdir = setup['root'] / 'sigterm'
  out = _run(setup, workdir, env_extra={'BEIT3_JAX_FAULT': 'sigterm_after_step:4'})
  assert 'Stopping after step 4 (SIGTERM)' in out.stdout and 'Stopped (SIGTERM)' in out.stdout
  assert _steps(workdir) == [1, 4]   # Orbax keeps a run's first step; then the stop, not 5
  _assert_resumed_equal(setup, workdir, straight, 4)


def _two_processes(setup, workdir, fault_on_process_1='', *flags):  # noqa: F811
  """Runs the tiny config as two processes of 4 CPU devices; returns their outputs."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4',
             JAX_COMPILATION_CACHE_DIR=setup['cache'], JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             PYTHONPATH=REPO, JAX_COORDINATOR_ADDRESS=f'localhost:{_free_port()}',
             JAX_NUM_PROCESSES='2')
  cmd = [sys.executable, '-m', 'beit3_jax.main', f'--config={setup["config"]}',
         f'--workdir={workdir}', *WORKERS, *flags]
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(env, JAX_PROCESS_ID=str(i), **(
                                {'BEIT3_JAX_FAULT': fault_on_process_1} if i and
                                fault_on_process_1 else {})))
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(setup, straight):  # noqa: F811
  workdir = setup['root'] / 'sigterm_two_processes'
  outs = _two_processes(setup, workdir, 'sigterm_after_step:4')
  stops = [re.search(r'Stopping after step (\d+) \(', out) for out in outs]
  assert all(stops), outs[0][-3000:]
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and 4 <= step < 10
  assert _steps(workdir)[-1] == step
  _two_processes(setup, workdir)
  a, b = _losses(straight), _losses(workdir)
  assert abs(a[10] - b[10]) <= 1e-5 * abs(a[10]), (a[10], b[10])



def _processes_with(marker: str) -> list[int]:
  """Live processes whose environment holds `marker` (a run's trainer and data workers)."""
  found = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/environ', 'rb') as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      continue
  return found


def _gone(marker: str, seconds: float = 10.0) -> bool:
  deadline = time.time() + seconds
  while _processes_with(marker) and time.time() < deadline:
    time.sleep(0.2)
  return not _processes_with(marker)


def test_sigterm_to_the_process_group_stops_the_data_workers_cleanly(setup, straight):  # noqa: F811
  """A machine's shutdown signals every process: the workers ignore it, the trainer finishes
  and saves its step, then stops them; nothing is left running, and the rerun is bitwise."""
  workdir = setup['root'] / 'sigterm_group_workers'
  marker = f'BEIT3_TEST_RUN={workdir.name}'
  out = _run(setup, workdir, new_session=True,
             env_extra={'BEIT3_JAX_FAULT': 'sigterm_group_after_step:4',
                        'BEIT3_TEST_RUN': workdir.name})
  assert 'Stopping after step 4 (SIGTERM)' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
  assert _gone(marker), _processes_with(marker)
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  _assert_resumed_equal(setup, workdir, straight, 4)


def test_a_killed_trainer_leaves_no_data_workers_and_resumes(setup, straight):  # noqa: F811
  workdir = setup['root'] / 'killed_with_workers'
  marker = f'BEIT3_TEST_RUN={workdir.name}'
  out = _run(setup, workdir, '--config.checkpoint_every=3', check=False,
             env_extra={'BEIT3_JAX_FAULT': 'kill_after_step:5', 'BEIT3_TEST_RUN': workdir.name})
  assert out.returncode == -9, out.stderr[-2000:]
  assert _gone(marker), _processes_with(marker)
  # Resumed from the newest checkpoint complete at the kill (3, or 1 while step 3's
  # asynchronous save was still being written).
  _assert_resumed_equal(setup, workdir, straight, max(_steps(workdir)))


@pytest.mark.parametrize('before,after', [(2, 1), (1, 2)])
def test_a_checkpoint_of_n_processes_resumes_on_m_processes(setup, straight, before,  # noqa: F811
                                                            after):
  """The data position is global: the run continues with the examples the straight run sees
  (its losses, step by step), whatever the number of processes before and after."""
  workdir = setup['root'] / f'processes_{before}_to_{after}'
  stop = '--config.stop_at_step=5'
  if before == 2:
    _two_processes(setup, workdir, '', stop)
  else:
    _run(setup, workdir, stop)
  if after == 2:
    _two_processes(setup, workdir, '')
  else:
    out = _run(setup, workdir)
    assert 'at step 5' in out.stdout
  a, b = _losses(straight), _losses(workdir)
  assert sorted(b) == list(range(1, 11))
  for step in range(1, 11):
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_truncated_newest_checkpoint_is_set_aside(setup, straight):  # noqa: F811
  workdir = _stopped_at_7(setup, 'truncated')
  for root, _, files in os.walk(workdir / 'checkpoints' / '7'):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  out = _assert_resumed_equal(setup, workdir, straight, 6)
  assert 'Checkpoint at step 7' in out.stdout and 'could not be read' in out.stdout
  assert os.path.isdir(workdir / 'checkpoints_unreadable' / '7')   # moved, not deleted


def test_missing_item_directory_is_set_aside(setup, straight):  # noqa: F811
  workdir = _stopped_at_7(setup, 'missing_item')
  shutil.rmtree(workdir / 'checkpoints' / '7' / 'data')
  out = _assert_resumed_equal(setup, workdir, straight, 6)
  assert 'moved it to' in out.stdout
  assert os.path.isdir(workdir / 'checkpoints_unreadable' / '7' / 'state')


def test_kill_during_a_save_resumes_from_the_save_before(setup, straight):  # noqa: F811
  workdir = setup['root'] / 'killed_in_save'
  out = _run(setup, workdir, '--config.checkpoint_every=3',
             env_extra={'BEIT3_JAX_FAULT': 'kill_in_checkpoint_save:6'}, check=False)
  assert out.returncode == 137, out.stderr[-2000:]
  assert _steps(workdir) == [1, 3]
  left = os.listdir(workdir / 'checkpoints')
  assert any(n.startswith('6') for n in left if not n.isdigit()), left   # the cut-short save
  _assert_resumed_equal(setup, workdir, straight, 3)


def test_diverging_learning_rate_stops_with_finite_checkpoints(setup):  # noqa: F811
  workdir = setup['root'] / 'diverging'
  out = _run(setup, workdir, '--config.optimizer.lr=1e4', '--config.max_nonfinite_steps=2',
             '--config.checkpoint_every=1', '--config.optimizer.clip_norm=0.0', check=False)
  assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
  assert 'Error:' in out.stderr and 'finite' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  for step in _steps(workdir):
    params = params_io.load_training_params(str(workdir / 'checkpoints' / str(step)))[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step
  lines = [json.loads(l) for l in open(workdir / 'metrics.jsonl') if '"loss"' in l]
  if 'in a row' in out.stderr:
    assert sum(l['skipped_updates'] for l in lines) >= 1


def _lock(workdir, **fields):
  os.makedirs(workdir, exist_ok=True)
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'run_id': 'other',
            'started': time.time() - 60, 'renewed': time.time(), 'lease_seconds': 600.0}
  record.update(fields)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), 'w') as f:
    json.dump(record, f)


def test_a_second_run_in_a_workdir_is_refused(setup):  # noqa: F811
  workdir = setup['root'] / 'locked'
  _lock(workdir)   # held by this (live) test process
  out = _run(setup, workdir, check=False)
  assert out.returncode == 1
  assert 'in use by another run' in out.stderr and f'pid {os.getpid()}' in out.stderr
  assert 'Traceback' not in out.stderr
  assert not os.path.exists(workdir / 'checkpoints')


def test_a_stale_lock_is_taken_over(setup):  # noqa: F811
  workdir = setup['root'] / 'stale'
  _lock(workdir, host='another-host', renewed=time.time() - 3600)
  out = _run(setup, workdir, '--config.total_steps=3')
  assert 'taking over the lock' in out.stdout and 'lease expired' in out.stdout
  assert not os.path.exists(workdir / workdir_lock.LOCK_FILE)   # released at the end


def test_lock_of_a_dead_process_on_this_host_is_stale():
  assert workdir_lock.stale_reason(
      {'host': socket.gethostname(), 'pid': 2 ** 22 + 12345, 'renewed': time.time(),
       'lease_seconds': 600}, time.time()) is not None
  assert workdir_lock.stale_reason(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'renewed': time.time(),
       'lease_seconds': 600}, time.time()) is None


class _Poisoned:
  """The test objective with its loss multiplied by batch['poison'] (1.0, or NaN to inject a
  non-finite loss)."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def normalizers(self, batch):
    return self.inner.normalizers({k: v for k, v in batch.items() if k != 'poison'})

  def loss(self, params, extra, frozen, batch, rng, normalizers, train, step=None):
    clean = {k: v for k, v in batch.items() if k != 'poison'}
    loss, aux = self.inner.loss(params, extra, frozen, clean, rng, normalizers, train=train,
                                step=step)
    return loss * batch['poison'][0], aux


@pytest.mark.usefixtures('fast_compile')
def test_a_non_finite_loss_skips_only_its_update(eight_devices):
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  objective = _Poisoned(fx.objective(depth=1))
  tx, schedule = fx.optimizer(depth=1)
  tok = fx.tokenizer_params()
  frozen = {'tokenizer': tok}
  state, shardings = step_lib.create_state(
      objective, tx, mesh, jax.random.key(0), frozen,
      {'tokenizer': jax.tree.map(lambda _: sharding.replicated(mesh), tok)})
  step = step_lib.make_train_step(objective, tx, schedule)
  seen = []
  for i, poison in enumerate((1.0, np.nan, 1.0)):
    batch = dict(fx.batch(100 + i, 8), poison=np.full((8,), poison, np.float32))
    before = jax.device_get(step_lib.checkpoint_items(state))
    with sharding.use_mesh(mesh):
      state, metrics = jax.jit(step)(state, batch, jax.random.key(i))
    after = jax.device_get(step_lib.checkpoint_items(state))
    seen.append(int(metrics['skipped']))
    assert int(after['step']) == i + 1
    unchanged = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves((before['params'], before['opt_state'], before['extra'])),
        jax.tree.leaves((after['params'], after['opt_state'], after['extra']))))
    assert unchanged == (i == 1), i   # (the warmup's lr is 0 at step 0: Adam's moments move)
  assert seen == [0, 1, 0]


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_stream():
  guard = loop.NonFiniteSteps(limit=3)
  nan, ok = jnp.float32(np.nan), jnp.float32(1.0)
  metrics = lambda skipped, text: {'skipped': jnp.int32(skipped),  # noqa: E731
                                   'tasks': {'image': {'ce': ok}, 'text': {'ce': text}}}
  guard.record(1, metrics(1, nan))
  guard.record(2, metrics(0, ok))          # a finite step resets the count
  guard.record(3, metrics(1, nan))
  guard.record(4, metrics(1, nan))
  with pytest.raises(loop.RunError, match=r'Steps 3 to 5: 3 steps in a row.*stream\(s\) text'):
    guard.record(5, metrics(1, nan))
  assert guard.total == 4


@pytest.mark.parametrize('override, message', [
    ({'total_steps': -5}, 'total_steps=-5: expected a number > 0'),
    ({'checkpoint_every': -1}, 'checkpoint_every=-1: expected a number >= 0'),
    ({'batch_size.text': -3}, 'batch_size.text=-3: expected a whole number >= 0'),
    ({'batch_size.image': 0, 'batch_size.text': 0, 'batch_size.pair': 0}, 'every stream is 0'),
    ({'optimizer.warmup_steps': 10}, 'warmup_steps=10: expected 0 <= warmup_steps < total'),
    ({'model.img_size': 36}, 'img_size=36 is not a multiple of patch_size=8'),
])
def test_values_no_run_can_start_with_are_named(setup, override, message):  # noqa: F811
  from beit3_jax.defaults import ConfigError, check_values, load_config_file
  config = load_config_file(setup['config'])
  check_values(config)   # the tiny config itself is fine
  for name, value in override.items():
    *parents, leaf = name.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    check_values(config)


def test_a_missing_split_stops_the_run_before_it_compiles(setup):  # noqa: F811
  workdir = setup['root'] / 'no_split'
  out = _run(setup, workdir, '--config.eval_every=5', '--config.data.eval_split=nosuch',
             check=False)
  assert out.returncode == 1 and 'Traceback' not in out.stderr
  assert "has no split 'nosuch'" in out.stderr and 'data.eval_split' in out.stderr
  assert 'Compiled the train step' not in out.stdout


def test_a_stream_reads_a_held_out_slice_of_its_train_split(setup):  # noqa: F811
  from beit3_jax.defaults import load_config_file
  from beit3_jax.jobs import pretraining
  config = load_config_file(setup['config'])
  config.data.splits = {'text': {'train': 'train[:75%]', 'eval': 'train[75%:]'}}
  tfds_dir, names, _ = pretraining.resolve_sources(config.data)
  train = pretraining.open_sources(config, tfds_dir, names, 'train')
  held_out = pretraining.open_sources(config, tfds_dir, names, 'eval')
  assert len(train['text']) + len(held_out['text']) == 48 and len(held_out['text']) == 12
  assert len(held_out['image']) == 8   # the other streams keep data.eval_split (validation)


def test_restore_target_keeps_the_optimizer_s_masked_nodes():
  """A frozen parameter's optimizer state is an optax.MaskedNode (no array) while the state's
  shardings hold a sharding there (the VQ-KD tokenizer's codebook): a fresh run and a resume
  both build their restore target from the two."""
  from beit3_jax.trainer import checkpoints
  import optax
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tree = {'mu': {'w': jnp.zeros((2, 3)), 'codebook': optax.MaskedNode()}}
  got = checkpoints.abstract_like(tree, {'mu': {'w': sharding, 'codebook': sharding}})
  assert isinstance(got['mu']['codebook'], optax.MaskedNode)
  assert got['mu']['w'] == jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=sharding)
