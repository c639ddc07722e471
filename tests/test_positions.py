"""Tests of beit3_jax.models.positions: torch-exact bicubic resize of the vision positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit3_jax.models import BEiT3, abstract_params, get_config, resize_vision_positions
from beit3_jax.models.positions import resize_grid_bicubic

TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_dim=64, img_size=32, patch_size=8,
            vocab_size=50, max_text_positions=16)
TABLE = ('encoder', 'embed_positions', 'A', 'embedding')


def _torch_bicubic(grid: np.ndarray, new_hw) -> np.ndarray:
  x = torch.from_numpy(grid).permute(2, 0, 1)[None]  # (1, D, h, w)
  y = torch.nn.functional.interpolate(x, size=new_hw, mode='bicubic', align_corners=False)
  return y[0].permute(1, 2, 0).numpy()


def _table(params):
  for key in TABLE:
    params = params[key]
  return np.asarray(params)


@pytest.fixture(scope='module')
def tiny():
  """A tiny config and random params of its real tree (init_params compiles for ~10 s)."""
  config = get_config('base', **TINY)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                        abstract_params(config, boxed=False))
  return config, params


@pytest.mark.parametrize('hw, new_hw', [((4, 4), (6, 6)), ((6, 6), (4, 4)), ((3, 3), (7, 7)),
                                        ((5, 3), (2, 8)), ((14, 14), (24, 24))])
def test_resize_grid_matches_torch(hw, new_hw):
  grid = np.random.default_rng(0).normal(size=(*hw, 5)).astype(np.float32)
  out = resize_grid_bicubic(grid, new_hw)
  assert out.shape == (*new_hw, 5) and out.dtype == np.float32
  np.testing.assert_allclose(out, _torch_bicubic(grid, new_hw), rtol=0, atol=1e-5)


def test_resize_grid_same_size_is_identity():
  grid = np.random.default_rng(1).normal(size=(6, 6, 5)).astype(np.float32)
  assert np.array_equal(resize_grid_bicubic(grid, (6, 6)), grid)


def test_same_size_is_identity(tiny):
  config, params = tiny
  new_params, new_config = resize_vision_positions(params, config, config.img_size)
  assert new_config.to_dict() == config.to_dict()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, new_params)


def test_resize_up_runs_model(tiny):
  config, params = tiny
  before = _table(params).copy()
  new_params, new_config = resize_vision_positions(params, config, 48)
  assert new_config.img_size == 48 and new_config.patch_size == 8
  table = _table(new_params)
  assert table.shape == ((48 // 8) ** 2 + 3, 32) and table.dtype == np.float32
  np.testing.assert_array_equal(table[:3], before[:3])
  np.testing.assert_array_equal(_table(params), before)  # input not mutated
  assert new_params['encoder']['layers_0'] is params['encoder']['layers_0']  # shared leaves
  assert new_params['encoder']['embed_positions']['B'] is params['encoder']['embed_positions']['B']
  from_numpy, _ = resize_vision_positions(jax.tree.map(np.asarray, params), config, 48)
  np.testing.assert_array_equal(_table(from_numpy), table)  # NumPy leaves work the same
  apply = jax.jit(lambda p, x: BEiT3(new_config).apply({'params': p}, images=x))
  out = apply(new_params, jnp.zeros((1, 48, 48, 3)))
  assert out['encoder_out'].shape == (1, 1 + 36, 32)


def test_bad_sizes_raise(tiny):
  config, params = tiny
  with pytest.raises(ValueError, match='multiple of patch_size'):
    resize_vision_positions(params, config, 50)
  other = get_config('base', **{**TINY, 'img_size': 48})
  with pytest.raises(ValueError, match='expects'):
    resize_vision_positions(params, other, 64)
