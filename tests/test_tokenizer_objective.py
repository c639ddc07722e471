"""Tests of beit3_jax.jobs.tokenizer_objective (VQ-KD codebook EMA, k-means, losses, teacher)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from beit3_jax import sharding
from beit3_jax.tokenizers import vqkd
from beit3_jax.jobs import tokenizer_objective as to

DECAY = 0.99


# ----------------------------------------------------------------------------- NumPy reference


def np_l2norm(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_kmeans(samples, means, iters):
  """unilm beit2 `kmeans(use_cosine_sim=True)` from given initial means."""
  n = means.shape[0]
  bins = np.zeros(n)
  for _ in range(iters):
    buckets = np.argmax(samples @ means.T, axis=-1)
    bins = np.bincount(buckets, minlength=n).astype(np.float32)
    zero = bins == 0
    new = np.zeros_like(means)
    np.add.at(new, buckets, samples)
    new = np_l2norm(new / np.where(zero, 1.0, bins)[:, None])
    means = np.where(zero[:, None], means, new)
  return means, bins


def np_update(weight, stats, z, ids, decay, init_means=None):
  """unilm beit2 `NormEMAVectorQuantizer.forward` (training), NumPy float32."""
  weight = weight.copy()
  emb = {k: v.copy() for k, v in stats['embedding'].items()}
  z = np_l2norm(z.reshape(-1, z.shape[-1]))
  ids = ids.reshape(-1)
  n = weight.shape[0]
  if not emb['initted'][0]:
    weight, bins = np_kmeans(z, init_means, 10)
    emb['cluster_size'] = bins.astype(np.float32)
    emb['initted'] = np.ones(1, np.float32)
    ids = np.argmax(z @ weight.T, axis=-1)
  bins = np.bincount(ids, minlength=n).astype(np.float32)
  cluster_size = (stats['cluster_size'] * np.float32(decay) + bins * np.float32(1 - decay))
  zero = bins == 0
  embed_sum = z.T @ np.eye(n, dtype=np.float32)[ids]
  embed_normalized = np_l2norm((embed_sum / np.where(zero, 1.0, bins)[None]).T)
  embed_normalized = np.where(zero[:, None], weight, embed_normalized)
  weight = np_l2norm(weight * np.float32(decay) + embed_normalized * np.float32(1 - decay))
  return weight, {'cluster_size': cluster_size, 'embedding': emb}


# ----------------------------------------------------------------------------- fixtures


def unit(rng, shape):
  return np_l2norm(rng.standard_normal(shape).astype(np.float32)).astype(np.float32)


def make_case(seed, n=32, c=8, b=8, t=8, initted=1.0):
  rng = np.random.default_rng(seed)
  codebook = unit(rng, (n, c))
  z = unit(rng, (b, t, c))
  ids = np.argmax(z @ codebook.T, axis=-1).astype(np.int32)
  stats = {'cluster_size': rng.uniform(0, 3, n).astype(np.float32),
           'embedding': {'cluster_size': rng.uniform(0, 3, n).astype(np.float32),
                         'embed_avg': rng.standard_normal((n, c)).astype(np.float32),
                         'initted': np.full((1,), initted, np.float32)}}
  return codebook, stats, z, ids


def assert_tree_close(a, b, atol=2e-6):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


update_jit = jax.jit(to.ema_codebook_update, static_argnames=('kmeans_iters',))


# ----------------------------------------------------------------------------- k-means


def clustered(seed, n_clusters=4, per=64, c=16, noise=0.03):
  rng = np.random.default_rng(seed)
  centres = np.eye(c, dtype=np.float32)[:n_clusters]  # orthogonal: well separated
  labels = np.repeat(np.arange(n_clusters), per)
  z = np_l2norm(centres[labels] + noise * rng.standard_normal((labels.size, c)))
  return centres, z.astype(np.float32)


def test_kmeans_finds_separated_clusters():
  centres, z = clustered(0)
  codes = np.asarray(jax.jit(to.kmeans_codebook, static_argnums=2)(jax.random.key(1), z, 16))
  assert codes.shape == (16, 16)
  np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-5)
  cos = codes @ centres.T                                   # (codes, true centres)
  assert np.all(1.0 - cos.max(axis=1) < 0.05), 'a centre is not near any true centre'
  assert np.all(1.0 - cos.max(axis=0) < 0.05), 'a true centre has no centre near it'


def test_kmeans_is_deterministic_in_rng():
  _, z = clustered(1)
  a = to.kmeans_codebook(jax.random.key(3), z, 16)
  b = to.kmeans_codebook(jax.random.key(3), z, 16)
  c = to.kmeans_codebook(jax.random.key(4), z, 16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_kmeans_matches_reference_iterations():
  rng = np.random.default_rng(2)
  z = unit(rng, (100, 8))
  key = jax.random.key(5)
  init = z[np.asarray(jax.random.permutation(key, 100)[:20])]   # the documented initial sample
  want, _ = np_kmeans(z, init, 10)
  got = to.kmeans_codebook(key, z, 20)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_kmeans_fewer_vectors_than_codes():
  rng = np.random.default_rng(3)
  z = unit(rng, (2, 3, 8))                                  # M = 6 < 20 codes
  codes = np.asarray(to.kmeans_codebook(jax.random.key(0), z, 20))
  assert codes.shape == (20, 8)
  np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, atol=1e-5)
  # Every centre is (a jittered copy of) one of the vectors, and no two are exactly equal.
  assert np.all((codes @ z.reshape(-1, 8).T).max(axis=1) > 0.999)
  assert len({tuple(r) for r in codes}) == 20


# ----------------------------------------------------------------------------- EMA update


@pytest.mark.parametrize('random_ids', [False, True])
def test_ema_update_matches_numpy_reference(random_ids):
  codebook, stats, z, ids = make_case(0)
  if random_ids:
    ids = np.random.default_rng(1).integers(0, 20, ids.shape).astype(np.int32)
  want_w, want_stats = np_update(codebook, stats, z, ids, DECAY)
  got_w, got_stats = update_jit(codebook, stats, z, ids, DECAY)
  np.testing.assert_allclose(np.asarray(got_w), want_w, atol=2e-6)
  assert_tree_close(got_stats, want_stats)
  # Codes with no assignment keep their value; embed_avg is never written.
  unused = np.setdiff1d(np.arange(codebook.shape[0]), ids)
  assert unused.size > 0
  np.testing.assert_allclose(np.asarray(got_w)[unused], codebook[unused], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_stats['embedding']['embed_avg']),
                                stats['embedding']['embed_avg'])
  used = np.unique(ids)
  assert np.all(np.abs(np.asarray(got_w)[used] - codebook[used]).max(axis=1) > 1e-4)


def test_ema_update_kmeans_init_branch():
  codebook, stats, z, ids = make_case(1, initted=0.0)       # M = 64 >= 32 codes
  key = jax.random.key(7)
  zf = z.reshape(-1, z.shape[-1])
  init = zf[np.asarray(jax.random.permutation(key, zf.shape[0])[:codebook.shape[0]])]
  want_w, want_stats = np_update(codebook, stats, z, ids, DECAY, init_means=init)
  got_w, got_stats = update_jit(codebook, stats, z, ids, DECAY, kmeans_rng=key)
  np.testing.assert_allclose(np.asarray(got_w), want_w, atol=2e-6)
  assert_tree_close(got_stats, want_stats)
  assert float(got_stats['embedding']['initted'][0]) == 1.0
  assert float(np.asarray(got_stats['embedding']['cluster_size']).sum()) == zf.shape[0]
  # Once initted, a second step is a plain EMA step (no k-means).
  want_w2, want_stats2 = np_update(want_w, want_stats, z, ids, DECAY)
  got_w2, got_stats2 = update_jit(got_w, got_stats, z, ids, DECAY, kmeans_rng=key)
  np.testing.assert_allclose(np.asarray(got_w2), want_w2, atol=5e-6)
  assert_tree_close(got_stats2, want_stats2, atol=5e-6)


def test_ema_update_keeps_vq_stats_tree_of_the_model():
  cfg = vqkd.get_vqkd_config('base', img_size=16, patch_size=8, embed_dim=16, depth=1,
                             num_heads=2, mlp_dim=32, n_embed=16, code_dim=8,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                             decoder_mlp_dim=32, decoder_out_dim=13)
  params, vq_stats = vqkd.abstract_variables(cfg)         # the model's tree, not allocated
  rng = np.random.default_rng(0)
  vq_stats = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.uniform(0, 1, s.shape), s.dtype), vq_stats)
  spec = params['quantize']['embedding']['embedding']
  codebook = jnp.asarray(unit(rng, spec.shape), spec.dtype)
  z = jnp.asarray(unit(rng, (2, 4, 8)))
  ids = vqkd.nearest_code(z, codebook)
  new_w, new_stats = update_jit(codebook, vq_stats['quantize'], z, ids, cfg.decay)
  assert new_w.shape == codebook.shape and new_w.dtype == codebook.dtype
  assert (jax.tree_util.tree_structure(new_stats)
          == jax.tree_util.tree_structure(vq_stats['quantize']))
  for a, b in zip(jax.tree_util.tree_leaves(new_stats),
                  jax.tree_util.tree_leaves(vq_stats['quantize'])):
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize('initted', [1.0, 0.0])
def test_ema_update_sharded_matches_unsharded(eight_devices, initted):
  codebook, stats, z, ids = make_case(2, b=8, t=4, initted=initted)
  key = jax.random.key(11)
  want_w, want_stats = update_jit(codebook, stats, z, ids, DECAY, kmeans_rng=key)
  mesh = sharding.make_mesh((2, 2, 2))
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  zs, idss = jax.device_put(z, batch), jax.device_put(ids, batch)
  assert len(zs.sharding.device_set) == 8 and not zs.sharding.is_fully_replicated
  with sharding.use_mesh(mesh):
    got_w, got_stats = update_jit(codebook, stats, zs, idss, DECAY, kmeans_rng=key)
  np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), atol=2e-6)
  assert_tree_close(got_stats, want_stats)


# ----------------------------------------------------------------------------- loss, usage


def test_cosine_reconstruction_loss():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 7)).astype(np.float32)
  loss = to.cosine_reconstruction_loss(jnp.asarray(x, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert abs(float(loss)) < 1e-6
  e = np.eye(4, dtype=np.float32)
  assert float(to.cosine_reconstruction_loss(3.0 * e[None, :2], e[None, 2:])) == pytest.approx(1.0)
  assert float(to.cosine_reconstruction_loss(x, -2.0 * x)) == pytest.approx(2.0, abs=1e-6)
  y = rng.standard_normal((2, 5, 7)).astype(np.float32)
  want = np.mean(1 - np.sum(np_l2norm(x) * np_l2norm(y), -1))
  assert float(jax.jit(to.cosine_reconstruction_loss)(x, y)) == pytest.approx(want, abs=1e-6)


def test_codebook_usage():
  ids = jnp.array([[0, 0, 3], [3, 3, 7]], jnp.int32)
  frac, counts = jax.jit(to.codebook_usage, static_argnums=1)(ids, 8)
  np.testing.assert_array_equal(np.asarray(counts), [2, 0, 0, 3, 0, 0, 0, 1])
  assert float(frac) == pytest.approx(3 / 8)


# ----------------------------------------------------------------------------- pixel teacher


def test_teacher_feature_size():
  assert to.teacher_feature_size('pixel', 2) == 13
  assert to.teacher_feature_size('pixel', 1) == 4
  with pytest.raises(ValueError, match='Unknown teacher'):
    to.teacher_feature_size('clip', 2)


def test_pixel_teacher_shapes_and_values():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  feats = np.asarray(jax.jit(to.pixel_teacher, static_argnums=1)(images, 4))
  assert feats.shape == (2, 16, to.teacher_feature_size('pixel', 2))
  np.testing.assert_array_equal(feats[..., -1], 1.0)
  # Patch (1, 2) of image 0: pixels rows 4..7, cols 8..11; cell (i, j) is 2x2 pixels.
  patch = images[0, 4:8, 8:12]
  want = patch.reshape(2, 2, 2, 2, 3).mean(axis=(1, 3)).reshape(-1)
  np.testing.assert_allclose(feats[0, 1 * 4 + 2, :-1], want, atol=1e-6)
  # Mid-grey is (0, ..., 0, 1); a uniform colour is repeated in every cell.
  grey = np.asarray(to.pixel_teacher(np.zeros((1, 8, 8, 3), np.float32), 2))
  np.testing.assert_array_equal(grey[0], np.tile([0.0] * 12 + [1.0], (4, 1)))
  colour = np.asarray(to.pixel_teacher(np.broadcast_to(
      np.float32([0.5, -0.25, 1.0]), (1, 8, 8, 3)), 2, cells=1))
  np.testing.assert_allclose(colour[0], np.tile([0.5, -0.25, 1.0, 1.0], (4, 1)))
  with pytest.raises(ValueError, match='multiple'):
    to.pixel_teacher(images, 3)


def test_pixel_teacher_is_local_to_patches():
  rng = np.random.default_rng(1)
  a = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  b = a.copy()
  b[0, 8:16, 24:32] = rng.uniform(-1, 1, (8, 8, 3))           # patch (1, 3) of a 4 x 4 grid
  fa, fb = (np.asarray(to.pixel_teacher(x, 4)) for x in (a, b))
  diff = np.abs(fa - fb).max(axis=-1)[0]
  changed = 1 * 4 + 3
  assert diff[changed] > 1e-3
  np.testing.assert_array_equal(np.delete(diff, changed), 0.0)
