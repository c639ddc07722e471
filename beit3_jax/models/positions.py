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
  return _bicubic_matrix_at((dst + 0.5) * (size_in / size_out) - 0.5, size_in)


def _bicubic_matrix_at(src: np.ndarray, size_in: int) -> np.ndarray:
  """(len(src), size_in) float64 matrix sampling a line of `size_in` cells at the source
  coordinates `src` with torch's cubic kernel (A = -0.75) and border-clamped taps."""
  base = np.floor(src)
  weights = _cubic_weights(src - base)                                  # (out, 4)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, size_in - 1)
  matrix = np.zeros((src.shape[0], size_in), np.float64)
  rows = np.broadcast_to(np.arange(src.shape[0])[:, None], taps.shape)
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
  grid, (h, w), (new_h, new_w) = _checked_grid(grid, new_hw)
  return _resize_separable(grid, _bicubic_matrix(h, new_h), _bicubic_matrix(w, new_w))


def _checked_grid(grid, new_hw) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """(grid as an array, (h, w), (new_h, new_w)); ValueError for a grid that is not (h, w, D)
  or an empty size."""
  grid = np.asarray(grid)
  if grid.ndim != 3:
    raise ValueError(f'Expected a (h, w, D) grid, got shape {grid.shape}.')
  h, w, _ = grid.shape
  new_h, new_w = (int(s) for s in new_hw)
  if min(h, w, new_h, new_w) < 1:
    raise ValueError(f'Cannot resize a {h}x{w} grid to {new_h}x{new_w}.')
  return grid, (h, w), (new_h, new_w)


def _resize_separable(grid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """rows (new_h, h) then cols (new_w, w) applied to a (h, w, D) grid, in float64; the result
  in the grid's dtype."""
  x = np.einsum('ih,hwd->iwd', rows, grid.astype(np.float64))
  x = np.einsum('jw,iwd->ijd', cols, x)
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


# ----------------------------------------------------------------------------- scale factor

# BEiT v2 / DINO `interpolate_pos_encoding` adds this to the target grid before dividing by the
# source grid, so that floor(g * scale) is the target size despite float rounding.
BEIT2_SCALE_OFFSET = 0.1


def bicubic_scale_matrix(size_in: int, scale: float) -> np.ndarray:
  """(floor(size_in * scale), size_in) float64 matrix of torch's 1-D bicubic `interpolate` given
  a `scale_factor` (align_corners=False, recompute_scale_factor unset).

  torch then maps output cell i to the source coordinate (i + 0.5) / scale - 0.5 (not
  (i + 0.5) * size_in / size_out - 0.5 as for `size=`), with the same A = -0.75 cubic kernel
  and border-clamped taps as `resize_grid_bicubic`.
  """
  size_in, scale = int(size_in), float(scale)
  size_out = math.floor(size_in * scale)
  if size_in < 1 or not math.isfinite(scale) or size_out < 1:
    raise ValueError(f'Cannot resize {size_in} cells by scale_factor={scale}: the output must '
                     'have at least one cell.')
  return _bicubic_matrix_at((np.arange(size_out, dtype=np.float64) + 0.5) / scale - 0.5,
                            size_in)


def beit2_scale_factor(size_in: int, size_out: int) -> float:
  """The scale_factor BEiT v2 passes to torch to resize `size_in` cells to `size_out`:
  (size_out + 0.1) / size_in (a float, cells out per cell in)."""
  return (size_out + BEIT2_SCALE_OFFSET) / size_in


def resize_grid_beit2(grid: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
  """BEiT v2's position-grid resize of a (h, w, D) grid to (new_h, new_w, D).

  Reproduces unilm beit2 `VisionTransformer.interpolate_pos_encoding` (used by the VQ-KD
  tokenizer's encoder and decoder): torch `interpolate(x, scale_factor=((new_h + 0.1) / h,
  (new_w + 0.1) / w), mode='bicubic', align_corners=False)` on the (1, D, h, w) layout. The
  output has the requested size, but its cells sample the source at (i + 0.5) / scale - 0.5,
  slightly off the exact-size resize of `resize_grid_bicubic`. Separable, computed in float64.
  Unlike BEiT v2 (which only calls it when the token count changes) it is not the identity at
  the same size: callers skip it there.

  Args:
    grid: (h, w, D) array, floating dtype; the channel axis D is last.
    new_hw: (new_h, new_w), the output grid size in cells.

  Returns:
    (new_h, new_w, D) array of `grid`'s dtype.
  """
  grid, (h, w), (new_h, new_w) = _checked_grid(grid, new_hw)
  rows = bicubic_scale_matrix(h, beit2_scale_factor(h, new_h))
  cols = bicubic_scale_matrix(w, beit2_scale_factor(w, new_w))
  if (rows.shape[0], cols.shape[0]) != (new_h, new_w):  # floor((n + 0.1) / g * g) == n
    raise ValueError(f'scale_factor rounding gave a {rows.shape[0]}x{cols.shape[0]} grid, not '
                     f'{new_h}x{new_w}.')
  return _resize_separable(grid, rows, cols)
