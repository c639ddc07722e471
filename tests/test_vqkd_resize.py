"""The VQ-KD tokenizer's position-table resize at a view of another grid: BEiT v2's own rule
(torch bicubic `interpolate` with scale_factor (g' + 0.1) / g) against a torch port of its
`interpolate_pos_encoding`, and the exact-size rule kept behind `pos_resize='exact'`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from beit3_jax import defaults
from beit3_jax.models.positions import (beit2_scale_factor, bicubic_scale_matrix,
                                        resize_grid_beit2, resize_grid_bicubic)
from beit3_jax.tokenizers import VQKD, abstract_variables, get_vqkd_config, resize_pos_embed

# 32 px with patch 8: the tables are trained on a 4 x 4 grid.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
            n_embed=32, code_dim=8, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, decoder_mlp_dim=64, decoder_out_dim=16)


def torch_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int,
                                   patch: int) -> torch.Tensor:
  """The arithmetic of beit2 `VisionTransformer.interpolate_pos_encoding` for an NCHW input
  of height x width pixels: (1, 1 + g*g, D) -> (1, 1 + (height/patch) (width/patch), D)."""
  n = pos_embed.shape[1] - 1
  dim = pos_embed.shape[-1]
  side = math.sqrt(n)
  rows, cols = height // patch + 0.1, width // patch + 0.1
  grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, scale_factor=(rows / side, cols / side),
                                         mode='bicubic')
  assert tuple(grid.shape[-2:]) == (int(rows), int(cols))
  return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _table(g, dim=8, seed=0):
  return np.random.default_rng(seed).standard_normal((1, g * g + 1, dim)).astype(np.float32)


GRIDS = [(14, (16, 16)), (14, (18, 18)), (14, (4, 4)), (7, (9, 9)), (4, (5, 5)), (3, (7, 7)),
         (14, (16, 12)), (14, (1, 1))]


@pytest.mark.parametrize('g,new_hw', GRIDS)
def test_beit2_mode_matches_torch_interpolate_pos_encoding(g, new_hw):
  pos = _table(g)
  h, w = new_hw
  want = torch_interpolate_pos_encoding(torch.from_numpy(pos), h * 16, w * 16, 16).numpy()
  got = np.asarray(jax.jit(lambda p: resize_pos_embed(p, new_hw, 'beit2'))(pos))
  assert got.shape == want.shape == (1, h * w + 1, 8)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(resize_pos_embed(pos, new_hw), got, rtol=0, atol=1e-6)  # default
  # The exact-size rule samples elsewhere.
  exact = np.asarray(resize_pos_embed(pos, new_hw, 'exact'))
  assert np.abs(exact - want).max() > 1e-2


def test_scale_factor_rule_is_torch_in_float64():
  """The NumPy rule is torch's arithmetic (src = (i + 0.5) / scale - 0.5, floor(g * scale)
  cells, A = -0.75, clamped taps), to float64 rounding."""
  rng = np.random.default_rng(1)
  for g, n in ((14, 16), (14, 4), (5, 13), (6, 2)):
    grid = rng.standard_normal((g, g, 3))
    scale = beit2_scale_factor(g, n)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], scale_factor=(scale, scale),
        mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(resize_grid_beit2(grid, (n, n)), want, rtol=0, atol=1e-12)
    assert bicubic_scale_matrix(g, scale).shape == (n, g)
  # Another scale_factor than BEiT v2's: the output size is floor(g * scale).
  x = rng.standard_normal((1, 1, 10, 10))
  want = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=1.37,
                                         mode='bicubic')[0, 0].numpy()
  m = bicubic_scale_matrix(10, 1.37)
  np.testing.assert_allclose(m @ x[0, 0] @ m.T, want, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match='at least one cell'):
    bicubic_scale_matrix(4, 0.2)
  with pytest.raises(ValueError, match=r'\(h, w, D\)'):
    resize_grid_beit2(np.zeros((4, 4)), (5, 5))


def _tokenizer(seed=0):
  """Random params of the tiny tokenizer (no init compile): LayerNorm scales 1 + N(0, 0.1),
  unit codes, N(0, 1) position tables (init's 0.02 would hide them), the rest N(0, 0.1)."""
  shapes, _ = abstract_variables(get_vqkd_config('base', **TINY))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      x = 1 + 0.1 * x
    elif name.endswith("['pos_embed']"):
      pass
    elif 'quantize' in name:
      x /= np.linalg.norm(x, axis=-1, keepdims=True)
    else:
      x *= 0.1
    return jnp.asarray(x)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _with_tables(params, encoder_table, decoder_table):
  new = jax.tree.map(lambda x: x, params)
  new['encoder']['pos_embed'] = jnp.asarray(encoder_table)
  new['decoder']['pos_embed'] = jnp.asarray(decoder_table)
  return new


def _forward(cfg):
  """jit of the tokenizer-training pass: (params, images) -> dict of ids, z, z_q, rec."""
  return jax.jit(lambda p, x: VQKD(cfg).apply({'params': p}, x))


def _exact_table(table, new_g):
  t = np.asarray(table)
  g = math.isqrt(t.shape[1] - 1)
  grid = resize_grid_bicubic(t[0, 1:].reshape(g, g, -1), (new_g, new_g))
  return np.concatenate([t[:, :1], grid.reshape(1, new_g * new_g, -1)], axis=1)


def test_tokenizer_at_another_view_equals_torch_resized_tables():
  """A 56 px view (7 x 7 patches of a 4 x 4-grid tokenizer) gives the features, codes and
  reconstructions of a 56 px tokenizer whose tables BEiT v2's torch code resized."""
  params = _tokenizer()
  view = get_vqkd_config('base', **TINY, input_size=56)
  assert view.pos_resize == 'beit2'
  native = _forward(get_vqkd_config('base', **{**TINY, 'img_size': 56}))
  port = lambda t, side, patch: torch_interpolate_pos_encoding(
      torch.from_numpy(np.array(t)), side, side, patch).numpy()
  torch_params = _with_tables(params, port(params['encoder']['pos_embed'], 56, 8),
                              port(params['decoder']['pos_embed'], 7, 1))
  images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 56, 56, 3)), jnp.float32)

  ours, want = _forward(view)(params, images), native(torch_params, images)
  for key in ('z', 'rec'):  # z: the l2-normalised code features
    np.testing.assert_allclose(ours[key], want[key], rtol=0, atol=1e-5, err_msg=key)
  np.testing.assert_array_equal(ours['ids'], want['ids'])

  # The exact-size rule, still available, is another tokenizer on the same view.
  exact = _forward(get_vqkd_config('base', **TINY, input_size=56, pos_resize='exact'))(
      params, images)
  assert np.abs(exact['z'] - want['z']).max() > 1e-2
  assert (exact['ids'] != want['ids']).any()
  exact_params = _with_tables(params, _exact_table(params['encoder']['pos_embed'], 7),
                              _exact_table(params['decoder']['pos_embed'], 7))
  exact_want = native(exact_params, images)
  for key in ('z', 'rec'):
    np.testing.assert_allclose(exact[key], exact_want[key], rtol=0, atol=1e-5, err_msg=key)


def test_pos_resize_option_and_errors():
  assert get_vqkd_config().pos_resize == 'beit2'
  assert defaults.tokenizer_config().tokenizer.pos_resize == 'beit2'
  with pytest.raises(ValueError, match='pos_resize'):
    get_vqkd_config(pos_resize='bicubic')
  config = defaults.tokenizer_config()
  config.tokenizer.pos_resize = 'nearest'
  with pytest.raises(defaults.ConfigError, match='tokenizer.pos_resize'):
    defaults.check_values(config)
  pos = _table(4)
  with pytest.raises(ValueError, match='mode='):
    resize_pos_embed(pos, (5, 5), 'nearest')
  with pytest.raises(ValueError, match='0x5'):
    resize_pos_embed(pos, (0, 5))
  assert resize_pos_embed(pos, (4, 4)) is pos
  assert resize_pos_embed(pos, (4, 4), 'exact') is pos
