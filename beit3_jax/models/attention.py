"""The attention core, softmax(q k^T + bias) v, with interchangeable implementations.

`dot_product_attention(q, k, v, *, attn_bias=None, key_padding=None, implementation='xla')`:

  q            (B, S, H, d) in the compute dtype (float32 or bfloat16), already scaled by d**-0.5
  k, v         (B, S_k, H, d), same dtype as q
  attn_bias    None, or float32 additive bias broadcastable to (1, 1, S, S_k) (or (1, H, S, S_k));
               blocked positions hold a large negative number (the project uses -1e8)
  key_padding  None, or bool (B, 1, 1, S_k), True = padded key (never attended to)
  returns      (B, S, H, d) in q.dtype

Logits and softmax are float32 in every implementation. `implementation` (the config field
`model.attention`) is one of `IMPLEMENTATIONS`:

'xla'           einsum -> + bias -> padded keys set to float32 min -> softmax -> einsum, as plain
                XLA ops (the reference). A query whose keys are all padding averages the values
                uniformly over all S_k keys (finite output, zero gradient to q and k).
'cudnn_or_xla'  `jax.nn.dot_product_attention(scale=1.0)`, key padding passed as its boolean
                `mask` (True = keep) and the bias as `bias`. When the target platform is GPU it
                first asks for `implementation='cudnn'` (mask/bias broadcast to (., ., S, S_k),
                bias cast to q.dtype, as cuDNN requires) and, if that refuses the call at trace
                time (float32, unsupported head dim, no cuDNN, ...), uses `implementation=None`.
                (In JAX 0.10 `None` means XLA: it never picks cuDNN by itself.) Errors cuDNN
                raises only at compile time are not caught. The XLA path matches
                'xla' including all-padding rows (its masked logit is -0.7 * float32 max, so such
                rows are again uniform over all keys). cuDNN folds the mask into the bias; its
                result for an all-padding row is not guaranteed to equal 'xla''s uniform average.
'splash'        the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.
                splash_attention`), per example in the (H, S, d) layout, vmapped over the batch.
                - Key padding becomes segment ids (real keys and all queries segment 0, padded
                  keys segment 1). An example whose keys are *all* padding gets q = 0 and no
                  padding, which reproduces 'xla''s uniform average over the S_k keys (when there
                  is no bias) and its zero gradient to q and k.
                - S and S_k are padded up to a multiple of the kernel block (128, 256 or 512);
                  padded keys are masked (segment 1), the padded query rows are sliced off.
                - attn_bias must be concrete (numpy or a non-traced jax.Array) and boolean-able
                  (every entry 0 or <= -1e4) to become the kernel's static block-sparse mask
                  (`NumpyMask`, blocks that are entirely masked are skipped). A traced bias, a
                  bias with other values, one with a per-example batch dimension, or one that
                  blocks every key of some query falls back to the 'xla' path for that call.
                  With both a bias and key padding, a query whose allowed keys are all padding
                  differs from 'xla' (both are finite averages, over different keys).
                - Runs in Pallas interpret mode (slow, but any backend) when the target is not a
                  TPU; see `interpret`.
                - Under a mesh (`jax.sharding.get_abstract_mesh()` non-empty, e.g. inside
                  `jax.set_mesh(mesh)`) the kernel, which GSPMD cannot partition, is wrapped in
                  `jax.shard_map`: batch split over the mesh axes 'data' and 'fsdp' and heads over
                  'tensor', each only when present and dividing the dimension; every other mesh
                  axis (and the sequence) is replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ('xla', 'cudnn_or_xla', 'splash')

_PAD_LOGIT = float(np.finfo(np.float32).min)
# An additive bias entry at or below this counts as "blocked" when turning it into a mask:
# exp(-1e4) underflows to 0 in float32 next to any realistic logit.
_BLOCKED_BIAS = -1e4
_BATCH_AXES = ('data', 'fsdp')
_HEAD_AXIS = 'tensor'


def dot_product_attention(q, k, v, *, attn_bias=None, key_padding=None, implementation='xla',
                          interpret: bool | None = None) -> jax.Array:
  """softmax(q k^T + attn_bias, masked by key_padding) v; see the module docstring.

  `interpret` only concerns 'splash': None runs the Pallas kernel compiled for TPU when the
  target platform is TPU, else in interpret mode. The target is the device platform of the
  abstract mesh in context (`jax.set_mesh`), or `jax.default_backend()` when there is none.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {implementation!r} (config field '
                     f'`model.attention`); valid names: {", ".join(IMPLEMENTATIONS)}.')
  if implementation == 'xla':
    return _xla_attention(q, k, v, attn_bias, key_padding)
  if implementation == 'cudnn_or_xla':
    return _jax_nn_attention(q, k, v, attn_bias, key_padding)
  return _splash_attention(q, k, v, attn_bias, key_padding, interpret)


def _target_platform() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


# ---------------------------------------------------------------------------------------------
# 'xla'


def _xla_attention(q, k, v, attn_bias, key_padding):
  dtype = q.dtype
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  if attn_bias is not None:
    logits = logits + attn_bias
  if key_padding is not None:
    logits = jnp.where(key_padding, _PAD_LOGIT, logits)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


# ---------------------------------------------------------------------------------------------
# 'cudnn_or_xla'


def _jax_nn_attention(q, k, v, attn_bias, key_padding):
  mask = None if key_padding is None else jnp.logical_not(key_padding)
  bias = None if attn_bias is None else jnp.asarray(attn_bias, jnp.float32)
  if _target_platform() == 'gpu':
    # cuDNN wants a bias/mask with full (S, S_k) extent and, here, the bias in the q dtype.
    s = q.shape[1]
    full = lambda x: None if x is None else jnp.broadcast_to(x, x.shape[:2] + (s, x.shape[3]))
    try:
      return jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else full(bias).astype(q.dtype), mask=full(mask),
          scale=1.0, implementation='cudnn').astype(q.dtype)
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      pass  # cuDNN does not take this call (dtype, head dim, version, ...): use XLA
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0,
                                      implementation=None).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# 'splash'


def _concrete_keep_mask(attn_bias, num_heads, s, s_k):
  """The bias as a bool (1 or H, S, S_k) keep-mask, or None if it is traced / not a mask."""
  try:
    bias = np.asarray(attn_bias, dtype=np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  if bias.ndim != 4 or bias.shape[0] != 1 or bias.shape[1] not in (1, num_heads):
    return None
  blocked = bias <= _BLOCKED_BIAS
  if not np.all(blocked | (bias == 0)):
    return None
  keep = np.broadcast_to(~blocked[0], (bias.shape[1], s, s_k))
  if not keep.any(axis=-1).all():
    return None  # a query with no allowed key: the kernel would divide by zero
  return keep


def _block_and_padded_length(n):
  padded = -(-n // 128) * 128
  block = next(b for b in (512, 256, 128) if padded % b == 0)
  return block, padded


def _make_kernel(num_heads, sp, skp, block_q, block_kv, keep, interpret):
  """The splash kernel for `num_heads` heads and a (1 or H, S_p, S_kp) keep-mask (None = full).

  Not cached: the kernel holds its block-sparsity tables as arrays, staged into the current
  trace. The numpy work behind them (`process_mask`) is cached by the splash module itself.
  """
  if keep is None:
    masks = [splash.FullMask((sp, skp))] * num_heads
  else:
    per_head = [splash.NumpyMask(m) for m in keep]
    masks = per_head * num_heads if len(per_head) == 1 else per_head
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  return splash.make_splash_mha_single_device(
      splash.MultiHeadMask(masks), block_sizes=sizes, interpret=interpret)


def _splash_attention(q, k, v, attn_bias, key_padding, interpret):
  b, s, h, _ = q.shape
  s_k = k.shape[1]
  keep = None
  if attn_bias is not None:
    keep = _concrete_keep_mask(attn_bias, h, s, s_k)
    if keep is None:
      return _xla_attention(q, k, v, attn_bias, key_padding)
  if interpret is None:
    interpret = _target_platform() != 'tpu'

  block_q, sp = _block_and_padded_length(s)
  block_kv, skp = _block_and_padded_length(s_k)
  if keep is not None:
    padded = np.zeros((keep.shape[0], sp, skp), np.bool_)
    padded[:, :s, :s_k] = keep
    padded[:, s:, :s_k] = True  # padded query rows (sliced off) see every real key
    keep = None if padded.all() else padded

  # Segment ids (B, S_kp) for the keys: 1 = padding (key padding or length padding), else 0.
  kv_segments = None
  if key_padding is not None or skp != s_k:
    pad = (jnp.zeros((b, s_k), jnp.bool_) if key_padding is None
           else jnp.reshape(key_padding, (b, s_k)).astype(jnp.bool_))
    if key_padding is not None:
      all_pad = jnp.all(pad, axis=-1)
      # Every key padded: attend uniformly to all S_k keys, as 'xla' does (q = 0 -> equal logits).
      q = jnp.where(all_pad[:, None, None, None], jnp.zeros_like(q), q)
      pad = jnp.logical_and(pad, jnp.logical_not(all_pad)[:, None])
    pad = jnp.pad(pad, ((0, 0), (0, skp - s_k)), constant_values=True)
    kv_segments = pad.astype(jnp.int32)

  # (B, S, H, d) -> (B, H, S_p, d)
  def to_kernel_layout(x, length):
    x = jnp.transpose(x, (0, 2, 1, 3))
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

  q_t, k_t, v_t = to_kernel_layout(q, sp), to_kernel_layout(k, skp), to_kernel_layout(v, skp)

  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch_axes, shards = (), 1
  for name in _BATCH_AXES:
    if name in sizes and b % (shards * sizes[name]) == 0:
      batch_axes += (name,)
      shards *= sizes[name]
  # A mask that differs per head is built for all H heads, so heads then stay unsplit.
  split_heads = (_HEAD_AXIS in sizes and h % sizes[_HEAD_AXIS] == 0
                 and (keep is None or keep.shape[0] == 1))
  head_axis = _HEAD_AXIS if split_heads else None
  local_heads = h // sizes[_HEAD_AXIS] if split_heads else h

  def attend(q_t, k_t, v_t, *kv_segments):
    kernel = _make_kernel(local_heads, sp, skp, block_q, block_kv, keep, interpret)
    if not kv_segments:
      return jax.vmap(kernel)(q_t, k_t, v_t)
    q_segments = jnp.zeros((sp,), jnp.int32)  # padded query rows too: they are sliced off
    one = lambda q1, k1, v1, kv1: kernel(q1, k1, v1, splash.SegmentIds(q=q_segments, kv=kv1))
    return jax.vmap(one)(q_t, k_t, v_t, kv_segments[0])

  args = (q_t, k_t, v_t) + (() if kv_segments is None else (kv_segments,))
  if mesh.empty:
    out = attend(*args)
  else:
    batch = batch_axes or None
    qkv_spec = P(batch, head_axis, None, None)
    specs = (qkv_spec,) * 3 + (() if kv_segments is None else (P(batch, None),))
    out = jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                        check_vma=False)(*args)
  return jnp.transpose(out[:, :, :s], (0, 2, 1, 3)).astype(q.dtype)
