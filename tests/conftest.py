"""Test setup: 8 simulated CPU devices, quiet TF, and no network for TFDS.

This runs before any test module imports jax.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds')

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # for the torchscale_ref helper

import jax  # noqa: E402
import pytest  # noqa: E402

from beit3_jax import models  # noqa: E402


def tiny_config(**overrides):
  """A 2-layer model small enough for a test to compile and run in about a second."""
  fields = dict(embed_dim=48, depth=2, num_heads=4, mlp_dim=96, img_size=32, patch_size=8,
                vocab_size=101, max_text_positions=24)
  fields.update(overrides)
  return models.get_config('base', **fields)


def apply(cfg, params, *, rngs=None, **kwargs):
  """`BEiT3(cfg).apply` under jit (eager Flax is slow on CPU); bool/None kwargs are static."""
  static = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
  arrays = {k: v for k, v in kwargs.items() if k not in static and v is not None}
  model = models.BEiT3(cfg)
  fn = jax.jit(lambda p, a, r: model.apply({'params': p}, **a, **static, rngs=r))
  return fn(params, arrays, rngs)


@pytest.fixture(scope='session')
def eight_devices():
  assert jax.device_count() == 8, 'tests/conftest.py must run before jax starts'
  return jax.devices()


@pytest.fixture(scope='module')
def fast_compile():
  """XLA with most optimisations off: trainer tests compile whole train steps, and on 2 cores
  compile time dominates (numerics are checked against runs under the same setting)."""
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', False)
