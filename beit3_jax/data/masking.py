"""Masking for BEiT-3 pretraining (masked data modeling), in NumPy.

The numbers come from the BEiT-3 paper ("Image as a Foreign Language", Sec. 2.2): it masks
40% of the image patches with the block-wise strategy of BEiT, 15% of the tokens of monomodal
text, and 50% of the text tokens of image-text pairs. The 80/10/10 split of the selected text
tokens (mask token / random token / unchanged) is BERT's, as used by unilm's BEiT-3 captioning
code.

Everything here is deterministic given a `np.random.Generator`: the same generator state gives
the same masks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Collection

import numpy as np

# BERT's split of the selected text tokens: MASK_PROB -> mask id, RANDOM_PROB -> random id,
# the rest unchanged.
MASK_PROB = 0.8
RANDOM_PROB = 0.1

# Tries to place one block before the round gives up (as in unilm's masking generator).
BLOCK_ATTEMPTS = 10


def _check_grid(grid) -> tuple[int, int]:
  if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
    raise ValueError(f'grid must be two positive ints (h, w), got {grid!r}.')
  return int(grid[0]), int(grid[1])


def _add_block(rng: np.random.Generator, mask: np.ndarray, min_block: int, max_new: int,
               log_aspect: tuple[float, float]) -> int:
  """Tries up to BLOCK_ATTEMPTS times to mask one rectangle; returns the new patches masked.

  Args:
    rng: the random generator.
    mask: (H, W) bool, updated in place.
    min_block: smallest target area in patches (already <= max_new).
    max_new: most patches this block may add (also the largest target area).
    log_aspect: (log min_aspect, log max_aspect) of the block's h / w.

  Returns:
    How many patches became masked (0 when every attempt was rejected).
  """
  height, width = mask.shape
  for _ in range(BLOCK_ATTEMPTS):
    area = rng.uniform(min_block, max_new)
    aspect = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      window = mask[top:top + h, left:left + w]
      new = h * w - int(window.sum())
      if 0 < new <= max_new:
        window[...] = True
        return new
  return 0


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masked: int,
               min_block: int = 16, max_block: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> np.ndarray:
  """Block-wise image masking of BEiT / BEiT v2, with exactly `num_masked` patches masked.

  While fewer than `num_masked` patches are masked, one block is added: its area is drawn
  from U(min_block, min(max_block, remaining)), its aspect ratio h / w from a log-uniform
  distribution over [min_aspect, max_aspect], h = round(sqrt(area * aspect)) and
  w = round(sqrt(area / aspect)); if h < H and w < W it gets a uniform top-left corner and is
  kept when it masks between 1 and `remaining` new patches (at most BLOCK_ATTEMPTS = 10 tries
  per block). The loop stops early when a block cannot be placed. Finally the count is made
  exact by masking random unmasked patches (or un-masking random masked ones).

  Small grids work: `min_block` is clamped to the patches still to mask, blocks that do not
  fit are rejected, and the fix-up at the end still gives the exact count.

  Args:
    rng: the random generator; the only source of randomness.
    grid: (H, W) patches, e.g. (14, 14) for 224 px images with 16 px patches.
    num_masked: patches to mask, 0 <= num_masked <= H * W.
    min_block: smallest block area in patches (BEiT: 16).
    max_block: largest block area in patches; None = num_masked.
    min_aspect: smallest h / w of a block (BEiT: 0.3).
    max_aspect: largest h / w of a block; None = 1 / min_aspect.

  Returns:
    (H * W,) bool, row-major, True = masked, with exactly `num_masked` True.

  Raises:
    ValueError: on a bad grid, count, block size or aspect ratio.
  """
  height, width = _check_grid(grid)
  num_patches = height * width
  if not 0 <= num_masked <= num_patches:
    raise ValueError(f'num_masked must be in [0, {num_patches}] for grid {grid}, '
                     f'got {num_masked}.')
  if min_block < 1:
    raise ValueError(f'min_block must be >= 1, got {min_block}.')
  if max_block is None:
    max_block = num_masked
  if max_block < 1 and num_masked > 0:
    raise ValueError(f'max_block must be >= 1, got {max_block}.')
  if max_aspect is None:
    max_aspect = 1.0 / min_aspect if min_aspect > 0 else min_aspect
  if not 0 < min_aspect <= max_aspect:
    raise ValueError(f'Need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}.')

  mask = np.zeros((height, width), dtype=bool)
  log_aspect = (math.log(min_aspect), math.log(max_aspect))
  count = 0
  while count < num_masked:
    max_new = min(num_masked - count, max_block)
    added = _add_block(rng, mask, min(min_block, max_new), max_new, log_aspect)
    if added == 0:
      break
    count += added

  flat = mask.reshape(-1)
  if count > num_masked:  # Cannot happen with the acceptance rule; kept as a guarantee.
    flat[rng.choice(np.flatnonzero(flat), count - num_masked, replace=False)] = False
  elif count < num_masked:
    flat[rng.choice(np.flatnonzero(~flat), num_masked - count, replace=False)] = True
  return flat


@dataclasses.dataclass(frozen=True)
class BlockMaskConfig:
  """Settings of block-wise image masking; the defaults are BEiT-3's.

  Attributes:
    ratio: fraction of patches to mask (BEiT-3: 40%, e.g. round(0.4 * 196) = 78 on 14 x 14).
    min_block: smallest block area in patches.
    max_block: largest block area in patches; None = the number to mask.
    min_aspect: smallest h / w of a block.
    max_aspect: largest h / w of a block; None = 1 / min_aspect.
  """
  ratio: float = 0.4
  min_block: int = 16
  max_block: int | None = None
  min_aspect: float = 0.3
  max_aspect: float | None = None

  def __post_init__(self):
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f'ratio must be in [0, 1], got {self.ratio}.')

  def num_masked(self, num_patches: int) -> int:
    """Patches to mask: round(ratio * num_patches) (Python round), e.g. 40% of 196 = 78."""
    return int(round(self.ratio * num_patches))

  def sample(self, rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """One mask for `grid` (H, W): (H * W,) bool, row-major, True = masked."""
    height, width = _check_grid(grid)
    return block_mask(rng, grid, self.num_masked(height * width), min_block=self.min_block,
                      max_block=self.max_block, min_aspect=self.min_aspect,
                      max_aspect=self.max_aspect)


def num_text_masked(n_candidates: int, ratio: float) -> int:
  """Text tokens to mask in a row: round(ratio * n_candidates) (Python round).

  At least 1 when there is a candidate and ratio > 0, so that short rows still give a loss;
  0 when there are no candidates or ratio == 0.
  """
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f'ratio must be in [0, 1], got {ratio}.')
  if n_candidates < 0:
    raise ValueError(f'n_candidates must be >= 0, got {n_candidates}.')
  if n_candidates == 0 or ratio == 0.0:
    return 0
  return min(n_candidates, max(1, int(round(ratio * n_candidates))))


def mask_text(rng: np.random.Generator, ids: np.ndarray, padding_mask: np.ndarray | None,
              ratio: float, mask_id: int, special_ids: Collection[int], random_low: int,
              random_high: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT-style text masking (BEiT-3: 15% of monomodal text, 50% of text in image-text pairs).

  Candidates are the positions that are neither padding nor a special id. In each row exactly
  `num_text_masked(n_candidates, ratio)` candidates are chosen uniformly (at least 1 when the
  row has a candidate and ratio > 0). Each chosen position, decided by one rng.random() draw,
  becomes `mask_id` (80%), a random id uniform over [random_low, random_high) minus the special
  ids (10%; it may equal the original id), or stays unchanged (10%).

  Args:
    rng: the random generator; the only source of randomness.
    ids: (L,) or (B, L) integer token ids.
    padding_mask: bool, same shape as ids, True = padding; None = no padding.
    ratio: fraction of the candidates to mask, in [0, 1].
    mask_id: id of the mask token.
    special_ids: ids never masked (e.g. BOS, EOS, PAD); also never drawn as random ids.
    random_low: smallest random replacement id.
    random_high: one past the largest random replacement id.

  Returns:
    input_ids: same shape and dtype as ids, with the chosen positions replaced.
    targets: int32, same shape, the original ids (use them only where mask_positions).
    mask_positions: bool, same shape, True = chosen for the loss.

  Raises:
    ValueError: on a bad ratio, mismatched shapes, non-integer ids or an empty random range.
  """
  ids = np.asarray(ids)
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f'ratio must be in [0, 1], got {ratio}.')
  if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'ids must be integer (L,) or (B, L), got {ids.dtype} {ids.shape}.')
  if padding_mask is None:
    padding_mask = np.zeros(ids.shape, dtype=bool)
  padding_mask = np.asarray(padding_mask)
  if padding_mask.shape != ids.shape or padding_mask.dtype != np.bool_:
    raise ValueError(f'padding_mask must be bool {ids.shape}, got {padding_mask.dtype} '
                     f'{padding_mask.shape}.')
  special = np.asarray(sorted(special_ids), dtype=np.int64)
  # The allowed random ids are [random_low, random_high) minus the special ids; the r-th of
  # them is found without listing them (a 64k vocabulary made that list the costliest part).
  skipped = special[(special >= random_low) & (special < random_high)]
  n_allowed = random_high - random_low - skipped.size
  if n_allowed <= 0:
    raise ValueError(f'No random ids in [{random_low}, {random_high}) outside the special ids.')

  def allowed(r: np.ndarray) -> np.ndarray:
    out = r.astype(np.int64) + random_low
    for s in skipped:   # ascending: each special id at or below pushes the id up by one
      out += out >= s
    return out

  rows = ids.reshape(1, -1) if ids.ndim == 1 else ids
  pads = padding_mask.reshape(rows.shape)
  candidates = ~pads & ~np.isin(rows, special)
  inputs = rows.copy()
  positions = np.zeros(rows.shape, dtype=bool)
  for b in range(rows.shape[0]):
    where = np.flatnonzero(candidates[b])
    k = num_text_masked(where.size, ratio)
    if k == 0:
      continue
    chosen = np.sort(rng.choice(where, k, replace=False))
    positions[b, chosen] = True
    u = rng.random(k)
    inputs[b, chosen[u < MASK_PROB]] = mask_id
    to_random = chosen[(u >= MASK_PROB) & (u < MASK_PROB + RANDOM_PROB)]
    inputs[b, to_random] = allowed(rng.integers(0, n_allowed, to_random.size))

  return (inputs.reshape(ids.shape), ids.astype(np.int32), positions.reshape(ids.shape))
