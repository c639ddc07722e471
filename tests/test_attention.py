"""The attention core's implementations ('cudnn_or_xla', 'splash') against the 'xla' reference.

On CPU 'splash' runs the Pallas kernel in interpret mode; the last test compiles it for real for
a TPU v5p slice (libtpu's compiler, no TPU needed).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from beit3_jax.models import attention

_BLOCKED = -1e8  # the project's additive "blocked" bias


def _qkv(b, s, h, d, dtype=jnp.float32, s_k=None, seed=0):
  rng = np.random.default_rng(seed)
  s_k = s if s_k is None else s_k
  q = jnp.asarray(rng.normal(size=(b, s, h, d)) * d ** -0.5, dtype)
  k = jnp.asarray(rng.normal(size=(b, s_k, h, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s_k, h, d)), dtype)
  return q, k, v


def _key_padding(b, s_k, real_lengths):
  pad = np.zeros((b, 1, 1, s_k), bool)
  for i, n in enumerate(real_lengths):
    pad[i, ..., n:] = True
  return pad


def _causal(s, s_k=None):
  s_k = s if s_k is None else s_k
  keep = np.tril(np.ones((s, s_k), bool), k=s_k - s)
  return np.where(keep, 0.0, _BLOCKED).astype(np.float32)[None, None]


# (name, B, S, H, d, dtype, key padding lengths or None, causal bias?)
CASES = [
    ('plain', 2, 20, 2, 16, jnp.float32, None, False),
    ('padding', 2, 37, 2, 64, jnp.float32, (37, 11), False),
    ('causal', 2, 37, 2, 16, jnp.float32, None, True),
    ('causal+padding', 2, 20, 2, 16, jnp.float32, (15, 20), True),
    ('bf16 padding+causal', 2, 37, 2, 16, jnp.bfloat16, (30, 9), True),
]


@pytest.mark.parametrize('impl', ['cudnn_or_xla', 'splash'])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_matches_xla(impl, case):
  _, b, s, h, d, dtype, lengths, causal = case
  q, k, v = _qkv(b, s, h, d, dtype)
  kp = None if lengths is None else jnp.asarray(_key_padding(b, s, lengths))
  bias = _causal(s) if causal else None

  def run(name):
    fn = jax.jit(lambda q, k, v, kp: attention.dot_product_attention(
        q, k, v, attn_bias=bias, key_padding=kp, implementation=name))  # bias: numpy constant
    return fn(q, k, v, kp)

  want, got = run('xla'), run(impl)
  assert got.shape == q.shape and got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=tol, rtol=tol)


def test_splash_cross_lengths_and_all_padding_rows():
  """S != S_k (as with a key/value cache), and an example whose keys are all padding."""
  q, k, v = _qkv(2, 5, 2, 16, s_k=19)
  kp = jnp.asarray(_key_padding(2, 19, (12, 0)))
  for bias in (None, _causal(5, 19)):
    want = attention.dot_product_attention(q, k, v, attn_bias=bias, key_padding=None)
    got = attention.dot_product_attention(q, k, v, attn_bias=bias, implementation='splash')
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  want = attention.dot_product_attention(q, k, v, key_padding=kp)
  got = attention.dot_product_attention(q, k, v, key_padding=kp, implementation='splash')
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)  # incl. uniform all-pad rows


def test_splash_traced_bias_falls_back_to_xla():
  q, k, v = _qkv(2, 20, 2, 16)
  bias = jnp.asarray(_causal(20))
  fn = lambda impl: jax.jit(lambda q, k, v, bias: attention.dot_product_attention(
      q, k, v, attn_bias=bias, implementation=impl))(q, k, v, bias)
  np.testing.assert_array_equal(fn('splash'), fn('xla'))


def test_splash_gradients_match_xla():
  q, k, v = _qkv(2, 37, 2, 16, seed=1)
  kp = jnp.asarray(_key_padding(2, 37, (37, 13)))
  bias = _causal(37)

  def grads(impl):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
        q, k, v, attn_bias=bias, key_padding=kp, implementation=impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for want, got in zip(grads('xla'), grads('splash')):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_unknown_implementation():
  q, k, v = _qkv(1, 4, 1, 8)
  with pytest.raises(ValueError, match=r"model\.attention.*xla, cudnn_or_xla, splash"):
    attention.dot_product_attention(q, k, v, implementation='flash')


def test_splash_under_cpu_mesh(eight_devices):
  mesh = jax.sharding.Mesh(np.array(eight_devices).reshape(2, 4, 1), ('data', 'fsdp', 'tensor'))
  q, k, v = _qkv(8, 20, 2, 16)
  kp = _key_padding(8, 20, range(20, 12, -1))
  want = attention.dot_product_attention(q, k, v, key_padding=kp)
  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P(('data', 'fsdp')))
    fn = jax.jit(lambda q, k, v, kp: attention.dot_product_attention(
        q, k, v, key_padding=kp, implementation='splash'),
        in_shardings=(batch,) * 4, out_shardings=batch)
    got = fn(*[jax.device_put(x, batch) for x in (q, k, v, kp)])
  assert got.sharding.spec == P(('data', 'fsdp'))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_compiles_for_tpu_slice():
  """Forward + backward of the real (not interpreted) kernel, compiled for a v5p 2x2x1 slice."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  topologies = pytest.importorskip('jax.experimental.topologies')
  try:
    devices = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1').devices
  except Exception as e:  # no libtpu
    pytest.skip(f'no TPU compiler: {e}')
  mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2, 1), ('data', 'fsdp', 'tensor'))
  b, s, h, d = 8, 256, 4, 64

  def loss_and_grads(q, k, v, kp):
    loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(
        q, k, v, key_padding=kp, implementation='splash').astype(jnp.float32) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  with jax.set_mesh(mesh):
    batch = NamedSharding(mesh, P(('data', 'fsdp')))
    qkv = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16, sharding=batch)
    kp = jax.ShapeDtypeStruct((b, 1, 1, s), jnp.bool_, sharding=batch)
    lowered = jax.jit(loss_and_grads, in_shardings=(batch,) * 4,
                      out_shardings=(NamedSharding(mesh, P()), (batch,) * 3)).lower(
                          qkv, qkv, qkv, kp)
    assert 'tpu_custom_call' in lowered.as_text()  # the Mosaic kernel, not interpret mode
    compiled = lowered.compile()
  flops = compiled.cost_analysis()['flops']
  print(f'v5p:2x2x1 splash fwd+bwd: flops={flops}, memory={compiled.memory_analysis()}')
  assert flops > 0
