"""Tests of block-wise image masking and BERT-style text masking."""

import numpy as np
import pytest

from beit3_jax.data import masking

SEEDS = range(50)


def _neighbour_score(mask: np.ndarray, grid) -> float:
  """Mean number of masked 4-neighbours of a masked patch."""
  m = mask.reshape(grid)
  padded = np.pad(m, 1)
  neighbours = (padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2]
                + padded[1:-1, 2:])
  return float(neighbours[m].mean())


@pytest.mark.parametrize('grid,num_masked', [
    ((14, 14), 78), ((14, 14), 75), ((16, 16), 102), ((8, 8), round(0.4 * 64)), ((4, 4), 6),
    ((4, 4), 0), ((4, 4), 16), ((14, 14), 0), ((14, 14), 196), ((1, 1), 1), ((3, 5), 7)])
def test_block_mask_exact_count(grid, num_masked):
  for seed in SEEDS:
    mask = masking.block_mask(np.random.default_rng(seed), grid, num_masked)
    assert mask.shape == (grid[0] * grid[1],)
    assert mask.dtype == np.bool_
    assert int(mask.sum()) == num_masked


def test_block_mask_small_blocks_and_aspects():
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    mask = masking.block_mask(rng, (8, 8), 20, min_block=4, max_block=9, min_aspect=0.5,
                              max_aspect=2.0)
    assert mask.sum() == 20


def test_block_mask_deterministic_and_seed_dependent():
  a = masking.block_mask(np.random.default_rng(3), (14, 14), 75)
  b = masking.block_mask(np.random.default_rng(3), (14, 14), 75)
  np.testing.assert_array_equal(a, b)
  masks = {masking.block_mask(np.random.default_rng(s), (14, 14), 75).tobytes() for s in SEEDS}
  assert len(masks) == len(SEEDS)


def test_block_mask_is_blockwise():
  grid, count = (14, 14), 75
  block, random = [], []
  for seed in SEEDS:
    rng = np.random.default_rng(seed)
    block.append(_neighbour_score(masking.block_mask(rng, grid, count), grid))
    rand = np.zeros(grid[0] * grid[1], dtype=bool)
    rand[rng.permutation(rand.size)[:count]] = True
    random.append(_neighbour_score(rand, grid))
  # A uniform mask gives ~1.4 masked neighbours; blocks give well over 2.
  assert np.mean(block) > np.mean(random) + 0.7, (np.mean(block), np.mean(random))
  assert np.median(block) > np.max(random)


@pytest.mark.parametrize('num_masked', [-1, 17])
def test_block_mask_rejects_bad_count(num_masked):
  with pytest.raises(ValueError, match=str(num_masked)):
    masking.block_mask(np.random.default_rng(0), (4, 4), num_masked)


def test_block_mask_rejects_bad_grid():
  with pytest.raises(ValueError, match='grid'):
    masking.block_mask(np.random.default_rng(0), (0, 4), 0)


def test_block_mask_config():
  cfg = masking.BlockMaskConfig()
  assert cfg.num_masked(196) == 78
  assert cfg.num_masked(64) == round(0.4 * 64)
  mask = cfg.sample(np.random.default_rng(0), (14, 14))
  assert mask.shape == (196,) and mask.sum() == 78
  np.testing.assert_array_equal(mask, masking.block_mask(np.random.default_rng(0), (14, 14), 78))
  assert cfg.sample(np.random.default_rng(0), (4, 4)).sum() == 6
  with pytest.raises(ValueError):
    masking.BlockMaskConfig(ratio=1.5)


def test_num_text_masked():
  assert masking.num_text_masked(0, 0.15) == 0
  assert masking.num_text_masked(3, 0.15) == 1  # round(0.45) = 0, raised to 1
  assert masking.num_text_masked(40, 0.15) == 6
  assert masking.num_text_masked(10, 0.5) == 5
  assert masking.num_text_masked(7, 1.0) == 7
  assert masking.num_text_masked(7, 0.0) == 0
  with pytest.raises(ValueError):
    masking.num_text_masked(5, -0.1)


SPECIAL = (0, 1, 2, 3)  # e.g. BOS, PAD, EOS, UNK
MASK_ID = 4
LOW, HIGH = 0, 5000


def _batch(rng, batch, length):
  """Rows of random lengths: [BOS, words..., EOS, PAD...]; words never special or MASK_ID."""
  ids = np.full((batch, length), 1, dtype=np.int32)
  pad = np.ones((batch, length), dtype=bool)
  lengths = rng.integers(0, length + 1, batch)
  for b, n in enumerate(lengths):
    if n == 0:
      continue
    ids[b, :n] = rng.integers(5, HIGH, n)
    ids[b, 0] = 0
    ids[b, n - 1] = 2
    pad[b, :n] = False
  return ids, pad


def _mask(rng, ids, pad, ratio):
  return masking.mask_text(rng, ids, pad, ratio, MASK_ID, SPECIAL, LOW, HIGH)


@pytest.mark.parametrize('ratio', [0.15, 0.5])
def test_mask_text_counts_and_invariants(ratio):
  rng = np.random.default_rng(0)
  ids, pad = _batch(rng, 64, 40)
  inputs, targets, positions = _mask(rng, ids, pad, ratio)
  assert inputs.shape == ids.shape and inputs.dtype == ids.dtype
  assert targets.dtype == np.int32 and positions.dtype == np.bool_
  np.testing.assert_array_equal(targets, ids)
  candidates = ~pad & ~np.isin(ids, SPECIAL)
  assert not np.any(positions & ~candidates)
  np.testing.assert_array_equal(inputs[~positions], ids[~positions])
  for b in range(ids.shape[0]):
    assert positions[b].sum() == masking.num_text_masked(int(candidates[b].sum()), ratio)


def test_mask_text_rows_without_candidates():
  ids = np.array([[0, 2, 1, 1], [1, 1, 1, 1], [0, 7, 2, 1]], dtype=np.int32)
  pad = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)
  inputs, _, positions = _mask(np.random.default_rng(0), ids, pad, 0.15)
  assert not positions[:2].any()
  np.testing.assert_array_equal(positions[2], [False, True, False, False])  # at least one
  np.testing.assert_array_equal(inputs[:2], ids[:2])


def test_mask_text_one_dimensional():
  ids = np.arange(10, 30, dtype=np.int64)
  pad = np.zeros(20, dtype=bool)
  inputs, targets, positions = _mask(np.random.default_rng(1), ids, pad, 0.5)
  assert inputs.shape == (20,) and inputs.dtype == np.int64
  assert positions.sum() == 10 and targets.dtype == np.int32


def test_mask_text_split_and_random_ids():
  rng = np.random.default_rng(7)
  ids = rng.integers(5, HIGH, (2000, 200)).astype(np.int32)  # never special, never MASK_ID
  pad = np.zeros(ids.shape, dtype=bool)
  inputs, _, positions = _mask(rng, ids, pad, 0.5)
  assert positions.sum() == 200_000
  new, old = inputs[positions], ids[positions]
  masked = new == MASK_ID
  # A random id equals the original with probability 1 / 4996 (~0.002% of all positions), so
  # it is counted as unchanged; that is far inside the tolerance.
  replaced = (new != MASK_ID) & (new != old)
  unchanged = new == old
  assert abs(masked.mean() - 0.8) < 0.01
  assert abs(replaced.mean() - 0.1) < 0.01
  assert abs(unchanged.mean() - 0.1) < 0.01
  random_ids = new[replaced]
  assert random_ids.min() >= LOW and random_ids.max() < HIGH
  assert not np.isin(random_ids, SPECIAL).any()


def test_mask_text_deterministic():
  ids, pad = _batch(np.random.default_rng(0), 16, 30)
  a = _mask(np.random.default_rng(5), ids, pad, 0.5)
  b = _mask(np.random.default_rng(5), ids, pad, 0.5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = _mask(np.random.default_rng(6), ids, pad, 0.5)
  assert not np.array_equal(a[2], c[2])


@pytest.mark.parametrize('ratio', [-0.1, 1.1])
def test_mask_text_rejects_bad_ratio(ratio):
  ids = np.arange(5, 10, dtype=np.int32)
  with pytest.raises(ValueError, match='ratio'):
    _mask(np.random.default_rng(0), ids, np.zeros(5, dtype=bool), ratio)


def test_mask_text_rejects_mismatched_padding():
  ids = np.arange(5, 10, dtype=np.int32)
  with pytest.raises(ValueError, match='padding_mask'):
    _mask(np.random.default_rng(0), ids, np.zeros(4, dtype=bool), 0.5)
