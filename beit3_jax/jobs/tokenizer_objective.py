"""Pieces of the VQ-KD tokenizer-training objective as pure, jit-able JAX functions.

Everything here is plain `jnp` on global arrays (no Flax modules, no collectives, no I/O), so it
runs unchanged inside a jitted train step under a device mesh: a feature batch (B, N, c) sharded
over B is reduced globally by construction, which is what the reference's `all_reduce` of the
per-code counts and sums achieves across GPUs.

Reference: unilm `beit2/norm_ema_quantizer.py` (`NormEMAVectorQuantizer`, `EmbeddingEMA`,
`kmeans`) and `beit2/modeling_vqkd.py` (`calculate_rec_loss`); see `ema_codebook_update` for the
equations and the few deliberate differences.

Public API:
  kmeans_codebook(rng, z, n_codes, iters=10) -> (n_codes, c) unit codes (spherical k-means).
  ema_codebook_update(codebook, stats, z, ids, decay, *, kmeans_rng=None)
      -> (new_codebook, new_stats): the reference's no-gradient codebook step, k-means init
      included.
  cosine_reconstruction_loss(rec, target) -> scalar mean of (1 - cosine).
  codebook_usage(ids, n_codes) -> (fraction of codes used, per-code counts).
  pixel_teacher(images, grid, *, cells=2) -> (B, grid*grid, cells*cells*3 + 1) teacher features.
  teacher_feature_size(kind, cells=2) -> int, the last axis of a teacher's features.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from beit3_jax.tokenizers.vqkd import l2_normalize, nearest_code

KMEANS_ITERS = 10          # the reference's `kmeans(data, num_tokens, 10, use_cosine_sim=True)`.
KMEANS_DUPLICATE_NOISE = 1e-3  # std of the jitter added to centres sampled with replacement.
TEACHER_KINDS = ('pixel',)


# ----------------------------------------------------------------------------- helpers


def _flat(z: jax.Array) -> jax.Array:
  """(..., c) -> (M, c) float32."""
  return z.reshape(-1, z.shape[-1]).astype(jnp.float32)


def _cluster_stats(z_flat: jax.Array, ids_flat: jax.Array, n: int):
  """Per-code counts (n,) float32 and sums of the assigned vectors (n, c) float32.

  `segment_sum` (a scatter-add) instead of the reference's one-hot matmul: the same sums
  without materialising an (M, n) one-hot matrix.
  """
  counts = jax.ops.segment_sum(jnp.ones(ids_flat.shape, jnp.float32), ids_flat, num_segments=n)
  sums = jax.ops.segment_sum(z_flat, ids_flat, num_segments=n)
  return counts, sums


def _cluster_means(counts: jax.Array, sums: jax.Array, previous: jax.Array) -> jax.Array:
  """l2-normalised mean of each cluster; clusters with no member keep `previous`."""
  empty = counts == 0
  means = l2_normalize(sums / jnp.where(empty, 1.0, counts)[:, None])
  return jnp.where(empty[:, None], previous, means)


def _replace(tree: Mapping[str, Any], **updates) -> Mapping[str, Any]:
  """A copy of a dict (or flax FrozenDict) with some keys replaced, of the same type."""
  if isinstance(tree, dict):
    out = dict(tree)
    out.update(updates)
    return out
  return tree.copy(updates)  # flax.core.FrozenDict.copy(add_or_replace)


# ----------------------------------------------------------------------------- k-means


def _spherical_kmeans(rng: jax.Array, z: jax.Array, n_codes: int,
                      iters: int) -> tuple[jax.Array, jax.Array]:
  """(codes (n_codes, c) unit rows, counts (n_codes,) float32); see `kmeans_codebook`."""
  z = l2_normalize(_flat(z))
  m, c = z.shape
  if m >= n_codes:
    means = z[jax.random.permutation(rng, m)[:n_codes]]
  else:
    pick_rng, noise_rng = jax.random.split(rng)
    means = z[jax.random.randint(pick_rng, (n_codes,), 0, m)]
    noise = KMEANS_DUPLICATE_NOISE * jax.random.normal(noise_rng, (n_codes, c), jnp.float32)
    means = l2_normalize(means + noise)

  def step(_, carry):
    means, _ = carry
    sim = jnp.einsum('mc,kc->mk', z, means, precision=jax.lax.Precision.HIGHEST)
    buckets = jnp.argmax(sim, axis=-1)
    counts, sums = _cluster_stats(z, buckets, n_codes)
    return _cluster_means(counts, sums, means), counts

  return jax.lax.fori_loop(0, iters, step, (means, jnp.zeros((n_codes,), jnp.float32)))


def kmeans_codebook(rng: jax.Array, z: jax.Array, n_codes: int,
                    iters: int = KMEANS_ITERS) -> jax.Array:
  """Spherical (cosine) k-means of unit vectors: the reference `kmeans(use_cosine_sim=True)`.

  Initial centres: a random sample of the rows of z, `z[jax.random.permutation(rng, M)[:n]]`
  (without replacement, the reference's `randperm`). When M < n_codes there are not enough
  rows: the centres are drawn with replacement (`jax.random.randint`, the reference's
  `randint`) and, unlike the reference, jittered by N(0, 1e-3^2) noise per coordinate and
  re-normalised, so that duplicated centres are not exactly equal (exact duplicates tie in the
  argmax; all points go to the first, and the copies stay frozen as empty clusters).

  Each of `iters` iterations: assign every row to argmax_k <z, mu_k>; mu_k <- l2-normalise(mean
  of its rows); a centre with no rows keeps its previous value.

  Args:
    rng: a PRNG key; the result is a deterministic function of (rng, z).
    z: (..., c) vectors, flattened to (M, c) and l2-normalised here (a no-op up to rounding
      for unit features).
    n_codes: number of centres.
    iters: Lloyd iterations (reference: 10).

  Returns:
    (n_codes, c) float32 centres with unit rows.
  """
  return _spherical_kmeans(rng, z, n_codes, iters)[0]


# ----------------------------------------------------------------------------- EMA update


def ema_codebook_update(codebook: jax.Array, stats: Mapping[str, Any], z: jax.Array,
                        ids: jax.Array, decay, *, kmeans_rng: jax.Array | None = None,
                        kmeans_iters: int = KMEANS_ITERS) -> tuple[jax.Array, Mapping[str, Any]]:
  """One training-time codebook update of `NormEMAVectorQuantizer` (no gradient).

  With W the codebook (n, c), unit rows; z_i the l2-normalised features (all B*N of the global
  batch) and k_i their code ids:

    0. k-means init (only when `stats['embedding']['initted'] == 0`; the reference's
       `EmbeddingEMA.init_embed_`, run before the lookup):
         W, counts_km = kmeans(z, n, 10 iterations, cosine)     (`kmeans_codebook`)
         stats['embedding']['cluster_size'] = counts_km         (counts of its last iteration)
         stats['embedding']['initted'] = 1
       and, as the reference looks the codes up after the init, k_i is recomputed as
       argmax_k <z_i, W_k> with the new W (the `ids` passed in were found with the old W).
    1. counts  n_k = #{i : k_i = k}                               (all-reduced in the reference)
       stats['cluster_size'] = decay * stats['cluster_size'] + (1 - decay) * n_k
    2. sums    s_k = sum_{i : k_i = k} z_i                        (all-reduced in the reference)
       m_k = l2norm(s_k / n_k) if n_k > 0 else W_k
    3. W_k <- l2norm(decay * W_k + (1 - decay) * m_k)
       (an unused code becomes l2norm(W_k) = W_k: it keeps its value.)

  The reference never writes `stats['embedding']['embed_avg']` in training (nor at k-means
  init): its `EmbeddingEMA.embed_avg_ema_update` / `weight_update` (the smoothed-count
  normalisation) are dead code in `NormEMAVectorQuantizer.forward`; neither is
  `stats['embedding']['cluster_size']` updated after the init. Both are kept as they are here.

  Differences from the reference (all deliberate):
    * k-means runs on the global batch (the reference runs it on each GPU's local batch and
      never synchronises the result).
    * The ids, z_q and reconstruction of the k-means step itself were computed by the caller
      with the pre-k-means codebook (the reference's forward already uses the k-means codes in
      that step); only this update uses ids recomputed against the k-means codes.
    * k-means with fewer vectors than codes jitters the duplicated centres (`kmeans_codebook`).

  Jit-able: the init is a `jax.lax.cond` on the `initted` flag, so only one branch runs.

  Args:
    codebook: (n, c) current codes (`params['quantize']['embedding']['embedding']`).
    stats: the quantizer's 'vq_stats' subtree, `vq_stats['quantize']`:
      {'cluster_size': (n,), 'embedding': {'cluster_size': (n,), 'embed_avg': (n, c),
      'initted': (1,)}}; returned with the same structure and dtypes.
    z: (B, N, c) (or any (..., c)) features, unit rows (re-normalised here; a no-op up to
      rounding for `VQKD.__call__`'s `z`).
    ids: (B, N) (matching z's leading axes) int ids of the codes nearest to z.
    decay: EMA decay (config.decay, 0.99).
    kmeans_rng: key for the k-means init; None -> `jax.random.key(0)`.
    kmeans_iters: k-means iterations (reference: 10).

  Returns:
    (new_codebook (n, c) in codebook's dtype, new_stats).
  """
  n, c = codebook.shape
  z_flat = l2_normalize(_flat(z))
  ids_flat = ids.reshape(-1).astype(jnp.int32)
  if z_flat.shape[0] != ids_flat.shape[0] or z_flat.shape[1] != c:
    raise ValueError(f'ema_codebook_update: z {z.shape} and ids {ids.shape} do not match a '
                     f'codebook of shape {codebook.shape}.')
  emb = stats['embedding']
  if kmeans_rng is None:
    kmeans_rng = jax.random.key(0)

  def keep(_):
    return (codebook.astype(jnp.float32), emb['cluster_size'].astype(jnp.float32), ids_flat)

  def init(_):
    codes, counts = _spherical_kmeans(kmeans_rng, z_flat, n, kmeans_iters)
    return codes, counts, nearest_code(z_flat, codes)

  weight, emb_cluster_size, ids_flat = jax.lax.cond(emb['initted'][0] > 0, keep, init, None)

  counts, sums = _cluster_stats(z_flat, ids_flat, n)
  cluster_size = decay * stats['cluster_size'].astype(jnp.float32) + (1 - decay) * counts
  means = _cluster_means(counts, sums, weight)
  new_weight = l2_normalize(decay * weight + (1 - decay) * means)

  new_emb = _replace(emb, cluster_size=emb_cluster_size.astype(emb['cluster_size'].dtype),
                     initted=jnp.ones_like(emb['initted']))
  new_stats = _replace(stats, cluster_size=cluster_size.astype(stats['cluster_size'].dtype),
                       embedding=new_emb)
  return new_weight.astype(codebook.dtype), new_stats


# ----------------------------------------------------------------------------- losses, metrics


def cosine_reconstruction_loss(rec: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over tokens of 1 - cos(rec, target): the reference `VQKD.calculate_rec_loss`.

  rec, target: (..., d); computed in float32; returns a float32 scalar. (The reference divides
  by the norms without an epsilon; here a zero vector has cosine 0 instead of NaN.)
  """
  rec = l2_normalize(rec.astype(jnp.float32))
  target = l2_normalize(target.astype(jnp.float32))
  return jnp.mean(1.0 - jnp.sum(rec * target, axis=-1))


def codebook_usage(ids: jax.Array, n_codes: int) -> tuple[jax.Array, jax.Array]:
  """(fraction of the n_codes codes that occur in ids (float32 scalar), counts (n_codes,) int32).

  Ids outside [0, n_codes) are not counted.
  """
  flat = ids.reshape(-1).astype(jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones(flat.shape, jnp.int32), flat, num_segments=n_codes)
  return jnp.mean((counts > 0).astype(jnp.float32)), counts


# ----------------------------------------------------------------------------- teachers


def teacher_feature_size(kind: str, cells: int = 2) -> int:
  """Size of the last axis of a teacher's features (the tokenizer's `decoder_out_dim`).

  'pixel': `pixel_teacher`, cells * cells * 3 colours + 1 constant coordinate.
  """
  if kind == 'pixel':
    if cells < 1:
      raise ValueError(f'cells={cells} must be >= 1.')
    return cells * cells * 3 + 1
  raise ValueError(f'Unknown teacher kind {kind!r}; known: {TEACHER_KINDS}.')


def pixel_teacher(images: jax.Array, grid: int, *, cells: int = 2) -> jax.Array:
  """A fixed teacher for small data: each patch's pooled colours plus a constant 1.

  The images are average-pooled to a (grid * cells, grid * cells) colour map; patch (r, q) of
  the grid x grid token grid (row-major, like the tokenizer's tokens) is described by its
  cells x cells pooled colours, flattened in (cell row, cell col, channel) order, followed by
  the constant 1.0:

    feature[b, r * grid + q] = [pool[b, r*cells + i, q*cells + j, ch] for i, j, ch] + [1.0]

  Why the constant: the reconstruction loss is a cosine, blind to the scale of the target.
  Colours in [-1, 1] put mid-grey at 0, so without it a uniform grey patch would be the zero
  vector (no direction at all) and a patch and its contrast-scaled copy (x vs 0.5 x about
  grey) would be the same target. With the extra 1 the direction of (x, 1) changes with the
  size of x, so the cosine target also sees brightness/contrast, and every target has norm >= 1.

  Args:
    images: (B, H, W, 3) in [-1, 1], H and W multiples of grid * cells (each pooled cell
      averages (H / (grid cells)) x (W / (grid cells)) pixels).
    grid: tokens per side (the tokenizer's grid: input_size // patch_size).
    cells: pooled cells per patch side.

  Returns:
    (B, grid * grid, cells * cells * 3 + 1) float32.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'pixel_teacher expects images (B, H, W, 3), got {images.shape}.')
  if grid < 1 or cells < 1:
    raise ValueError(f'grid={grid} and cells={cells} must be >= 1.')
  b, h, w, ch = images.shape
  side = grid * cells
  if h % side or w % side:
    raise ValueError(f'pixel_teacher: image size {(h, w)} is not a multiple of grid * cells '
                     f'= {grid} * {cells} = {side}.')
  x = images.astype(jnp.float32).reshape(b, side, h // side, side, w // side, ch)
  x = jnp.mean(x, axis=(2, 4))                                    # (B, side, side, 3)
  x = x.reshape(b, grid, cells, grid, cells, ch).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, grid * grid, cells * cells * ch)
  return jnp.concatenate([x, jnp.ones((b, grid * grid, 1), jnp.float32)], axis=-1)


# ----------------------------------------------------------------------------- dead codes


def restart_dead_codes(rng: jax.Array, codebook: jax.Array, cluster_size: jax.Array,
                       z: jax.Array, fraction: float) -> tuple[jax.Array, jax.Array]:
  """Moves codes that have fallen out of use onto features of the current batch.

  Not in BEiT v2 (whose 8192 x 32 codebook trained on ImageNet stays in use): a small tokenizer
  on a small data set can collapse onto a few codes when its encoder moves faster than the EMA
  follows. A code is dead when its EMA count is below `fraction` times the mean count per code
  (M / n for M features per batch); it is replaced by a feature drawn uniformly from the batch,
  and its EMA count is reset to the mean so it gets time to be used. `fraction` 0 = off.

  Args:
    rng: key of the draw.
    codebook: (n, c) unit codes.
    cluster_size: (n,) EMA counts (`vq_stats['quantize']['cluster_size']`).
    z: (..., c) unit features of the batch.
    fraction: threshold as a share of the mean count.

  Returns:
    (codebook, cluster_size) with the dead codes replaced.
  """
  n = codebook.shape[0]
  z_flat = l2_normalize(_flat(z))
  mean = z_flat.shape[0] / n
  dead = cluster_size < fraction * mean
  picks = jax.random.randint(rng, (n,), 0, z_flat.shape[0])
  replacement = jnp.take(z_flat, picks, axis=0).astype(codebook.dtype)
  codebook = jnp.where(dead[:, None], replacement, codebook)
  cluster_size = jnp.where(dead, jnp.asarray(mean, cluster_size.dtype), cluster_size)
  return codebook, cluster_size
