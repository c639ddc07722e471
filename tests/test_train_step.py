"""The train step: sharded = single device, accumulation = big batch, the objective's sums."""

import jax
import numpy as np
import pytest

import train_fixtures as fx
from beit3_jax import sharding
from beit3_jax.trainer import step as step_lib
from beit3_jax.losses import cross_entropy_sums, masked_slots

pytestmark = pytest.mark.usefixtures("fast_compile")


def _run(mesh, steps=5, micro_batches=1, b=8, seed=0, objective=None, **batch_kw):
  objective = objective or fx.objective()
  tx, schedule = fx.optimizer()
  tok = fx.tokenizer_params()
  tok_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tok)
  frozen = {'tokenizer': jax.device_put(tok, tok_shardings)}
  state, shardings = step_lib.create_state(objective, tx, mesh, jax.random.key(seed), frozen,
                                           {'tokenizer': tok_shardings})
  step = step_lib.make_train_step(objective, tx, schedule, micro_batches)
  batch_sharding = sharding.batch_sharding(mesh)
  losses, tasks = [], []
  jitted = None
  for i in range(steps):
    batch = jax.device_put(fx.batch(100 + i, b, **batch_kw), batch_sharding)
    with sharding.use_mesh(mesh):
      jitted = jitted or step_lib.jit_train_step(step, mesh, shardings, batch)
      state, metrics = jitted(state, batch, jax.random.fold_in(jax.random.key(1), i))
    metrics = jax.device_get(metrics)
    losses.append(float(metrics['loss']))
    tasks.append(metrics['tasks'])
  return np.array(losses), tasks, jax.device_get(state.params)


def _rel(a, b):
  return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))


@pytest.fixture(scope='module')
def eight_device_run(eight_devices):
  """5 steps, batch 16 per stream, on mesh (data 2, fsdp 2, tensor 2)."""
  return _run(sharding.make_mesh((2, 2, 2)), b=16)


def test_sharded_steps_equal_single_device(eight_devices, eight_device_run):
  l1, t1, _ = _run(sharding.make_mesh((1, 1, 1), devices=eight_devices[:1]), b=16)
  l8, t8, _ = eight_device_run
  assert np.all(np.isfinite(l1)) and l1[-1] < l1[0]
  assert _rel(l8, l1) <= 1e-4, (l8, l1)
  for a, b in zip(jax.tree.leaves(t8), jax.tree.leaves(t1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_two_micro_batches_equal_one_batch_of_twice_the_size(eight_device_run):
  l_big, t_big, p_big = eight_device_run
  l_acc, t_acc, p_acc = _run(sharding.make_mesh((2, 2, 2)), micro_batches=2, b=16)
  assert _rel(l_acc, l_big) <= 1e-4, (l_acc, l_big)
  for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Counts are exact integers in float32.
  assert t_acc[0]['text']['count'] == t_big[0]['text']['count']


def test_pair_image_masking_adds_a_task(eight_devices):
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  obj = fx.objective(pair_image_mask_ratio=0.25, depth=1)
  assert obj.tasks == ('image', 'text', 'pair', 'pair_image')
  losses, tasks, _ = _run(mesh, steps=2, objective=obj, pair_image_mask_ratio=0.25)
  assert tasks[0]['pair_image']['count'] == 8 * round(0.25 * 16)
  assert np.all(np.isfinite(losses))


def test_masked_slots_and_sums_against_numpy():
  rng = np.random.default_rng(0)
  mask = rng.random((4, 12)) < 0.3
  index, valid = jax.device_get(masked_slots(mask, 5))
  for row in range(4):
    want = np.flatnonzero(mask[row])[:5]
    np.testing.assert_array_equal(index[row][:len(want)], want)
    assert valid[row].sum() == len(want)
  logits = rng.normal(size=(4, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(4, 5)).astype(np.int32)
  sums = jax.device_get(cross_entropy_sums(logits, targets, valid, 7))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums['ce'], (ce * valid).sum(), rtol=1e-5)
  assert sums['count'] == valid.sum()
  assert sums['correct'] == ((logits.argmax(-1) == targets) & valid).sum()
  np.testing.assert_array_equal(sums['histogram'], np.bincount(targets[valid], minlength=7))


def test_summary_baseline_is_the_most_frequent_target_share():
  from beit3_jax.jobs.masked_modeling import summarize
  hist = np.array([0, 6, 3, 1])
  out = summarize({'text': {'ce': 20.0, 'correct': 5.0, 'count': 10.0, 'histogram': hist}})
  assert out['text/baseline_accuracy'] == pytest.approx(0.6)
  assert out['text/accuracy'] == pytest.approx(0.5)
  assert out['text/loss'] == pytest.approx(2.0)


def test_bfloat16_compute_keeps_float32_params(eight_devices):
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  obj = fx.objective(depth=1, dtype='bfloat16')
  losses_bf16, _, params = _run(mesh, steps=2, objective=obj)
  assert np.all(np.isfinite(losses_bf16))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  losses_f32, _, _ = _run(mesh, steps=2, objective=fx.objective(depth=1))
  assert abs(losses_bf16[0] - losses_f32[0]) <= 0.05 * abs(losses_f32[0])
