"""VQ-KD training with the trainer: k-means init, EMA codebook, reconstruction falls, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as fx
from beit3_jax import params_io, sharding
from beit3_jax.defaults import tokenizer_config
from beit3_jax.trainer import step as step_lib
from beit3_jax.jobs import tokenizer_objective as tobj
from beit3_jax.trainer.optimizer import make_optimizer
from beit3_jax.jobs.tokenizer_training import CODEBOOK, Teacher, VQKDTraining

pytestmark = pytest.mark.usefixtures('fast_compile')


def _images(seed, b=16):
  """Piecewise-constant colour blocks on the 4 x 4 patch grid of 32 px images (uint8)."""
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, size=(6, 3))
  blocks = palette[rng.integers(0, 6, size=(b, 4, 4))]
  return np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2).astype(np.uint8)


def _teacher(**fields):
  """The tokenizer job's teacher fields (every declared one) with these values."""
  config = tokenizer_config().teacher
  config.update(fields)
  return config


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_vqkd_training_learns_and_keeps_codebook_consistent(eight_devices, tmp_path):
  cfg = fx.tokenizer_config()
  teacher = Teacher(_teacher(kind='pixel', cells=2), cfg)
  objective = VQKDTraining(cfg, teacher, seed=0, dead_code_fraction=0.25)
  tx, schedule = make_optimizer(fx.optimizer_config(lr=2e-3, warmup_steps=2), 40, cfg.depth,
                                frozen=(r'^quantize/',))
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  state, shardings = step_lib.create_state(objective, tx, mesh, jax.random.key(0), {}, {})
  assert float(state.extra['vq_stats']['quantize']['embedding']['initted'][0]) == 0.0
  put = lambda b: jax.device_put(b, sharding.batch_sharding(mesh))  # noqa
  first = put({'image': {'image': _images(0)}})
  with sharding.use_mesh(mesh):
    params, extra = jax.jit(objective.first_batch_init)(state.params, state.extra, {}, first)
    state = state.replace(params=params, extra=extra)
    assert float(state.extra['vq_stats']['quantize']['embedding']['initted'][0]) == 1.0
    step = step_lib.jit_train_step(step_lib.make_train_step(objective, tx, schedule), mesh,
                                   shardings, first)
    rec = []
    for i in range(30):
      state, metrics = step(state, put({'image': {'image': _images(i % 4)}}),
                            jax.random.key(i))
      rec.append(float(metrics['tasks']['vqkd']['rec']) / float(metrics['tasks']['vqkd']['count']))
  assert rec[-1] < 0.5 * rec[0], rec
  codebook = np.asarray(_get(state.params, CODEBOOK))
  np.testing.assert_array_equal(codebook, np.asarray(state.extra['codebook']))
  np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, atol=1e-5)
  summary = objective.summarize(jax.device_get(objective.reduce(
      objective.loss(state.params, state.extra, {}, put({'image': {'image': _images(9)}}),
                     jax.random.key(0), {'tokens': jnp.float32(16 * 16)}, train=False)[1][0])))
  assert 0.0 < summary['vqkd/codebook_usage'] <= 1.0
  # The export a pretraining config's tokenizer.path reads.
  path = params_io.save_params(tmp_path / 'tok', jax.device_get(state.params), cfg, kind='vqkd',
                               extra={'vq_stats': jax.device_get(state.extra['vq_stats'])})
  params, stats, _ = params_io.load_vqkd_params(path)
  np.testing.assert_array_equal(_get(params, CODEBOOK), codebook)


def test_teacher_size_must_match_the_decoder():
  cfg = fx.tokenizer_config()
  teacher = Teacher(_teacher(kind='pixel', cells=1), cfg)
  with pytest.raises(ValueError, match='decoder_out_dim'):
    VQKDTraining(cfg, teacher)
  with pytest.raises(ValueError, match='teacher.path'):
    Teacher(_teacher(kind='beit3', path=''), cfg)


def test_the_planner_builds_a_named_teacher_without_its_weights():
  # The planner needs only the teacher's shapes: teacher.variant stands in for teacher.path.
  from beit3_jax.tokenizers import get_vqkd_config
  cfg = get_vqkd_config('base', decoder_out_dim=768)
  fields = _teacher(kind='beit3', path='', variant='base')
  with pytest.raises(ValueError, match='teacher.path'):
    Teacher(fields, cfg)   # a run needs the weights
  teacher = Teacher(fields, cfg, planning=True)
  assert (teacher.size, teacher.model_cfg.depth) == (768, 12)
  shapes = jax.tree.leaves(teacher.abstract_params())
  assert 215e6 < sum(np.prod(x.shape) for x in shapes) < 225e6   # all of BEiT-3 base
  with pytest.raises(ValueError, match='teacher.variant'):
    Teacher(_teacher(kind='beit3', path=''), cfg, planning=True)


def test_dead_codes_move_onto_batch_features():
  codebook = jnp.array(
      [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], jnp.float32)
  sizes = jnp.array([5.0, 0.01, 5.0, 5.0])
  z = jnp.tile(jnp.array([[0.6, 0.8, 0.0]]), (8, 1))
  new, new_sizes = jax.device_get(
      tobj.restart_dead_codes(jax.random.key(0), codebook, sizes, z, 0.25))
  codebook = np.asarray(codebook)
  np.testing.assert_allclose(new[1], [0.6, 0.8, 0.0], atol=1e-6)
  np.testing.assert_array_equal(new[[0, 2, 3]], codebook[[0, 2, 3]])
  assert float(new_sizes[1]) == 2.0 and float(new_sizes[0]) == 5.0
