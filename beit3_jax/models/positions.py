"""Resizing the vision position table for another image resolution (NumPy only).

unilm's BEiT-3 fine-tuning at a new resolution keeps the first 3 rows of
`encoder.embed_positions.A` (2 unused fairseq rows, then CLS) and resizes the patch rows, seen
as a (G, G, D) grid, with torch's bicubic `interpolate(align_corners=False)`. This module
reproduces that resize exactly (up to float32 rounding) without torch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from beit3_jax.models.config import config_from_dict, num_patches

# Rows of the vision table before the patches: 2 unused (fairseq offset) + CLS.
NUM_PREFIX_ROWS = 3
# torch's cubic convolution coefficient (upsample_bicubic2d).
_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Keys' cubic kernel (A = -0.75) for fractional offsets t (n,) -> tap weights (n, 4).

  Taps sit at distances t + 1, t, 1 - t, 2 - t from the source coordinate.
  """
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) float64 matrix of torch's 1-D bicubic resize, align_corners=False."""
  dst = np.arange(size_out, dtype=np.float64)
  # area_pixel_compute_source_index; for cubic torch does not clamp src at 0.
  src = (dst + 0.5) * (size_in / size_out) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)                                  # (out, 4)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, size_in - 1)
  matrix = np.zeros((size_out, size_in), np.float64)
  rows = np.broadcast_to(np.arange(size_out)[:, None], taps.shape)
  np.add.at(matrix, (rows, taps), weights)  # border taps clamp onto the same pixel and add up
  return matrix


def resize_grid_bicubic(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of a (h, w, D) grid to (new_h, new_w, D), as torch's `interpolate`.

  Matches `torch.nn.functional.interpolate(x, size=new_hw, mode='bicubic',
  align_corners=False)` on the (1, D, h, w) layout up to float rounding: cubic convolution with
  A = -0.75, source coordinate (dst + 0.5) * in / out - 0.5, 4 taps with indices clamped to
  the border. Separable (rows, then columns), computed in float64. At the same size it is
  exactly the identity.

  Args:
    grid: (h, w, D) array, floating dtype; the channel axis D is last.
    new_hw: (new_h, new_w), the output grid size in cells.

  Returns:
    (new_h, new_w, D) array of `grid`'s dtype.
  """
  grid = np.asarray(grid)
  if grid.ndim != 3:
    raise ValueError(f'Expected a (h, w, D) grid, got shape {grid.shape}.')
  h, w, _ = grid.shape
  new_h, new_w = (int(s) for s in new_hw)
  if min(h, w, new_h, new_w) < 1:
    raise ValueError(f'Cannot resize a {h}x{w} grid to {new_h}x{new_w}.')
  x = grid.astype(np.float64)
  x = np.einsum('ih,hwd->iwd', _bicubic_matrix(h, new_h), x)
  x = np.einsum('jw,iwd->ijd', _bicubic_matrix(w, new_w), x)
  return x.astype(grid.dtype)


def _replace_leaf(tree: Mapping, path: tuple[str, ...], value: Any) -> Mapping:
  """Copy of `tree` with the leaf at `path` replaced; only the dicts on the path are copied."""
  if not path:
    return value
  node = dict(tree)
  node[path[0]] = _replace_leaf(tree[path[0]], path[1:], value)
  return node if type(tree) is dict else type(tree)(node)  # keeps e.g. a FrozenDict


_TABLE_PATH = ('encoder', 'embed_positions', 'A', 'embedding')
# The table's flat name in a backbone's params (`convert.flatten_params`).
TABLE_NAME = '/'.join(_TABLE_PATH)


def square_grid_side(rows: int) -> int | None:
  """G if a vision table of `rows` rows holds a G x G patch grid (rows = G**2 + 3), else None."""
  g = math.isqrt(max(rows - NUM_PREFIX_ROWS, 0))
  return g if g > 0 and g * g + NUM_PREFIX_ROWS == rows else None


def resize_table(table: np.ndarray, new_rows: int) -> np.ndarray:
  """A vision position table (G**2 + 3, D) -> (G'**2 + 3, D) with new_rows = G'**2 + 3: the 3
  prefix rows kept, the patch grid resized with `resize_grid_bicubic`. float32 NumPy.

  Raises:
    ValueError: either row count is not a square grid plus the 3 prefix rows.
  """
  table = np.asarray(table, np.float32)
  g, new_g = square_grid_side(table.shape[0]), square_grid_side(new_rows)
  if table.ndim != 2 or g is None or new_g is None:
    raise ValueError(f'Cannot resize a vision position table of shape {table.shape} to '
                     f'{new_rows} rows: both must be G * G patch rows + {NUM_PREFIX_ROWS}.')
  grid = table[NUM_PREFIX_ROWS:].reshape(g, g, -1)
  patches = resize_grid_bicubic(grid, (new_g, new_g)).reshape(new_g * new_g, -1)
  return np.concatenate([table[:NUM_PREFIX_ROWS], patches], axis=0)


def resize_vision_positions(params: Mapping, config, new_img_size: int):
  """Resizes the vision position table to `new_img_size` x `new_img_size` images.

  The table `params['encoder']['embed_positions']['A']['embedding']`, (N_p + 3, D) with
  N_p = (img_size // patch_size)**2, keeps its first 3 rows (2 unused, CLS); its patch rows,
  a row-major (G, G, D) grid with G = img_size // patch_size, are resized bicubically to
  (G', G', D), G' = new_img_size // patch_size, as unilm does with torch (see
  `resize_grid_bicubic`). The patch size is unchanged.

  Args:
    params: the backbone's plain (unboxed) parameter tree; leaves NumPy or JAX arrays.
      Not modified.
    config: its model config (from `get_config`).
    new_img_size: the new square image side in pixels, a multiple of `config.patch_size`.

  Returns:
    (new_params, new_config): a new tree that shares every other leaf with `params`, whose
    table is a float32 NumPy array of shape (G'**2 + 3, D); and `config` with
    `img_size=new_img_size`. At the same size the table values are unchanged.

  Raises:
    ValueError: `new_img_size` is not a positive multiple of the patch size, or the table's
      shape does not match `config`.
  """
  p = config.patch_size
  if new_img_size <= 0 or new_img_size % p:
    raise ValueError(f'new_img_size={new_img_size} is not a positive multiple of '
                     f'patch_size={p}.')
  table = params
  for key in _TABLE_PATH:
    table = table[key]
  table = np.asarray(table, np.float32)
  expected = (num_patches(config) + NUM_PREFIX_ROWS, config.embed_dim)
  if table.shape != expected:
    raise ValueError(f'Vision position table has shape {table.shape}; config '
                     f'(img_size={config.img_size}, patch_size={p}, '
                     f'embed_dim={config.embed_dim}) expects {expected}.')
  new_table = resize_table(table, (new_img_size // p) ** 2 + NUM_PREFIX_ROWS)
  new_config = config_from_dict({**config.to_dict(), 'img_size': new_img_size})
  return _replace_leaf(params, _TABLE_PATH, new_table), new_config
