"""The Multiway Transformer encoder: attention and FFN sublayers, layers, final norm.

Layout of one layer (torchscale, pre-LN with Sub-LN "Magneto"; every norm and projection is
Multiway unless `shared_attention`):

    h = self_attn_layer_norm(x)
    h = out_proj(inner_attn_ln(attention(q_proj(h) * d**-0.5, k_proj(h), v_proj(h))))
    x = x + drop_path(h)
    h = final_layer_norm(x)                       # the pre-FFN norm, despite its name
    x = x + drop_path(fc2(ffn_layernorm(gelu(fc1(h)))))

Key/value cache (incremental decoding, torchscale's `incremental_state`): every layer can take
the keys and values of earlier tokens, {'key', 'value'} (B, S_cache, H, d) in the compute dtype,
which are prepended to this call's keys/values before attention; with `return_kv` the layer
also returns the concatenation (B, S_cache + S, H, d). Cached keys are never treated as padding.

Drop path draws from the rng collection 'drop_path' (one Bernoulli per sample, shared by every
token of the sample); it runs only when `deterministic=False` and the layer's rate is > 0.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.models import initializers
from beit3_jax.models.config import num_patches
from beit3_jax.models.embeddings import MultiwayPositions
from beit3_jax.models.layers import (LayerNorm, Linear, Multiway, TEXT_ONLY, VISION_ONLY,
                                     compute_dtype, constrain)

# Logits of padded keys. torchscale uses -inf, which turns a row whose keys are all padding
# into NaN; the most negative float gives the same softmax for every other row (exp underflows
# to exactly 0) and a uniform average over the padded keys for such a row.
_PAD_LOGIT = float(np.finfo(np.float32).min)
# Additive logit of a position blocked by `attn_mask` (torchscale's masked_fill value).
_BLOCKED_LOGIT = -1e8

ACT = ('batch', 'length', 'embed')  # logical names of the residual stream (B, S, D).


def drop_path(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Stochastic depth: zeroes whole samples of x (B, ...) with prob `rate`, scales by 1/keep."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('drop_path'), keep, shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _routed(module_name: str, make: Callable[..., nn.Module], shared: bool,
            use_vl_expert: bool = False):
  """A sublayer called as f(x, split_position): Multiway experts, or one shared module."""
  if shared:
    m = make(name=module_name)
    return lambda x, split_position: m(x)
  return Multiway(make, use_vl_expert, name=module_name)


class Attention(nn.Module):
  """Multi-head self-attention with Multiway (or shared) q/k/v/out projections and Sub-LN.

  Call: x (B, S, D) in the compute dtype, static split position, optional additive bias
  (1, 1, S, S_k) float32 and key padding (B, 1, 1, S_k) bool (True = pad) -> (B, S, D), where
  S_k = S_cache + S. `kv_cache` {'key', 'value'} (B, S_cache, H, d) holds earlier tokens'
  keys/values; with `return_kv=True` returns (out, {'key', 'value'} (B, S_k, H, d)).
  """
  config: Any
  layer: int

  @nn.compact
  def __call__(self, x, split_position, attn_bias=None, key_padding=None, kv_cache=None,
               return_kv: bool = False):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    d_model, n_heads = cfg.embed_dim, cfg.num_heads
    head_dim = d_model // n_heads
    shared = cfg.shared_attention

    def proj(role, in_features, features, axes):
      kinit, binit = initializers.linear_inits(cfg.init, int(np.prod(in_features)), role=role,
                                               layer=self.layer, depth=cfg.depth)
      make = functools.partial(Linear, in_features, features, axes, kinit, binit, dtype)
      return _routed(role, make, shared)

    qkv_axes = ('embed', 'heads', 'kv')
    q = proj('q_proj', (d_model,), (n_heads, head_dim), qkv_axes)(x, split_position)
    k = proj('k_proj', (d_model,), (n_heads, head_dim), qkv_axes)(x, split_position)
    v = proj('v_proj', (d_model,), (n_heads, head_dim), qkv_axes)(x, split_position)
    q = q * jnp.asarray(head_dim ** -0.5, dtype)  # after the bias, as torchscale
    q = constrain(q, ('batch', 'length', 'heads', 'kv'))
    if kv_cache is not None:
      k = jnp.concatenate([kv_cache['key'].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_cache['value'].astype(v.dtype), v], axis=1)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if attn_bias is not None:
      logits = logits + attn_bias
    if key_padding is not None:
      logits = jnp.where(key_padding, _PAD_LOGIT, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    b, s = out.shape[:2]
    out = out.reshape(b, s, d_model)
    ln = functools.partial(LayerNorm, cfg.layernorm_eps, 'norm', dtype)
    out = _routed('inner_attn_ln', ln, shared)(out, split_position)
    out = out.reshape(b, s, n_heads, head_dim)
    out = proj('out_proj', (n_heads, head_dim), (d_model,), ('heads', 'kv', 'embed'))(
        out, split_position)
    if return_kv:
      return out, {'key': k, 'value': v}
    return out


class FeedForward(nn.Module):
  """One FFN expert: fc1 -> exact GELU (float32) -> ffn_layernorm (over F) -> fc2."""
  config: Any
  layer: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    d, f = cfg.embed_dim, cfg.mlp_dim

    def linear(role, n_in, n_out, axes):
      kinit, binit = initializers.linear_inits(cfg.init, n_in, role=role, layer=self.layer,
                                               depth=cfg.depth)
      return Linear((n_in,), (n_out,), axes, kinit, binit, dtype, name=role)

    h = linear('fc1', d, f, ('embed', 'mlp'))(x)
    h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(dtype)
    h = constrain(h, ('batch', 'length', 'mlp'))
    h = LayerNorm(cfg.layernorm_eps, 'mlp', dtype, name='ffn_layernorm')(h)
    return linear('fc2', f, d, ('mlp', 'embed'))(h)


class EncoderLayer(nn.Module):
  """One Multiway layer: (B, S, D) -> (B, S, D). See the module docstring for the layout.

  With `return_kv=True` returns (x, {'key', 'value'}) (the attention's keys/values, cache
  included); `kv_cache` as in `Attention`.
  """
  config: Any
  layer: int

  @nn.compact
  def __call__(self, x, split_position, attn_bias, key_padding, deterministic, kv_cache=None,
               return_kv: bool = False):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    rate = float(np.linspace(0.0, cfg.drop_path_rate, cfg.depth)[self.layer])
    use_vl = self.layer >= cfg.depth - cfg.num_vl_layers
    ln = functools.partial(LayerNorm, cfg.layernorm_eps, 'norm', dtype)

    h = _routed('self_attn_layer_norm', ln, cfg.shared_attention)(x, split_position)
    h = Attention(cfg, self.layer, name='self_attn')(h, split_position, attn_bias, key_padding,
                                                     kv_cache, return_kv)
    if return_kv:
      h, kv = h
    x = x + drop_path(self, h, rate, deterministic)
    h = Multiway(ln, use_vl, name='final_layer_norm')(x, split_position)
    h = Multiway(functools.partial(FeedForward, cfg, self.layer), use_vl, name='ffn')(
        h, split_position)
    x = x + drop_path(self, h, rate, deterministic)
    x = constrain(x, ACT)
    if return_kv:
      return x, kv
    return x


class Encoder(nn.Module):
  """torchscale's `encoder`: position tables, padding, the layers, the final Multiway norm.

  Call: token embeddings (B, S, D) in vision-first order, static split position, padding
  (B, S) bool or None, attention mask (S, S) bool/int or None (True/1 = blocked).
  Returns (encoder_out (B, S, D), hidden states: list of depth + 1 arrays (B, S, D), new cache
  or None), always three elements.

  Incremental decoding: `text_positions` (B, L) int gives the text tokens explicit 0-based
  positions (see `MultiwayPositions`). `cache`, a sequence of `depth` dicts {'key', 'value'}
  (B, S_cache, H, d), is prepended to each layer's keys/values; the attention mask is then
  (S, S_cache + S) and the padding mask covers only the S new tokens (cached keys are never
  padding). With a cache or `return_cache=True` the third element is the new cache: a tuple
  of `depth` dicts (B, S_cache + S, H, d) (S_cache = 0 without a cache); otherwise None.
  """
  config: Any

  @nn.compact
  def __call__(self, x, split_position, padding_mask, attn_mask, deterministic,
               text_positions=None, cache=None, return_cache: bool = False):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    seq_len = x.shape[1]

    pos = MultiwayPositions(num_patches(cfg) + 3, cfg.max_text_positions, cfg.embed_dim, dtype,
                            cfg.position_init_std,
                            name='embed_positions')(seq_len, split_position, text_positions)
    x = x + pos
    if padding_mask is not None:
      x = x * (1 - padding_mask[..., None].astype(dtype))
    x = constrain(x, ACT)

    attn_bias = None
    if attn_mask is not None:
      attn_bias = jnp.where(jnp.asarray(attn_mask).astype(bool), _BLOCKED_LOGIT, 0.0)
      attn_bias = attn_bias.astype(jnp.float32)[None, None]
    with_cache = cache is not None or return_cache
    if cache is not None and len(cache) != cfg.depth:
      raise ValueError(f'cache has {len(cache)} layers, the encoder has {cfg.depth}.')
    key_padding = None
    if padding_mask is not None:
      key_padding = padding_mask
      cache_len = 0 if cache is None else cache[0]['key'].shape[1]
      if cache_len:
        key_padding = jnp.concatenate(
            [jnp.zeros((padding_mask.shape[0], cache_len), bool), padding_mask], axis=1)
      key_padding = key_padding[:, None, None, :]

    layer_cls = EncoderLayer
    if cfg.remat:
      layer_cls = nn.remat(EncoderLayer, static_argnums=(2, 5, 7) if with_cache else (2, 5))
    hidden = [x]
    new_cache = []
    for i in range(cfg.depth):
      layer = layer_cls(cfg, i, name=f'layers_{i}')
      if with_cache:
        x, kv = layer(x, split_position, attn_bias, key_padding, deterministic,
                      None if cache is None else cache[i], True)
        new_cache.append(kv)
      else:
        x = layer(x, split_position, attn_bias, key_padding, deterministic)
      hidden.append(x)
    if cfg.normalize_output:
      ln = functools.partial(LayerNorm, cfg.layernorm_eps, 'norm', dtype)
      x = Multiway(ln, name='layer_norm')(x, split_position)
    return x, hidden, (tuple(new_cache) if with_cache else None)

