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
from jax.ad_checkpoint import checkpoint_name

from beit3_jax.models import attention, initializers, layer_stack
from beit3_jax.models.config import num_patches, remat_policy
from beit3_jax.models.embeddings import MultiwayPositions
from beit3_jax.models.layers import (LayerNorm, Linear, Multiway, TEXT_ONLY, VISION_ONLY,
                                     compute_dtype, constrain)

# Additive logit of a position blocked by `attn_mask` (torchscale's masked_fill value).
_BLOCKED_LOGIT = -1e8

ACT = ('batch', 'length', 'embed')  # logical names of the residual stream (B, S, D).


def drop_path_rate(config, layer) -> float | jax.Array:
  """Layer `layer`'s stochastic-depth rate, linspace(0, drop_path_rate, depth)[layer] (a float
  for an int layer, a float32 scalar for a traced one inside scanned layers)."""
  if isinstance(layer, int):
    return float(np.linspace(0.0, config.drop_path_rate, config.depth)[layer])
  return config.drop_path_rate * jnp.asarray(layer, jnp.float32) / max(config.depth - 1, 1)


def drop_path(module: nn.Module, x: jax.Array, rate, deterministic: bool) -> jax.Array:
  """Stochastic depth: zeroes whole samples of x (B, ...) with prob `rate`, scales by 1/keep.

  `rate` is a float, or a traced scalar (scanned layers)."""
  if deterministic or (isinstance(rate, float) and rate == 0.0):
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('drop_path'), keep, shape)
  if not isinstance(keep, float):
    keep = keep.astype(x.dtype)   # a traced rate must not promote bfloat16 activations
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
    q, k, v = (checkpoint_name(t, n) for t, n in
               ((q, 'query_proj'), (k, 'key_proj'), (v, 'value_proj')))
    q = q * jnp.asarray(head_dim ** -0.5, dtype)  # after the bias, as torchscale
    q = constrain(q, ('batch', 'length', 'heads', 'kv'))
    if kv_cache is not None:
      k = jnp.concatenate([kv_cache['key'].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_cache['value'].astype(v.dtype), v], axis=1)
    out = attention.dot_product_attention(q, k, v, attn_bias=attn_bias,
                                          key_padding=key_padding,
                                          implementation=cfg.attention)
    b, s = out.shape[:2]
    out = out.reshape(b, s, d_model)
    ln = functools.partial(LayerNorm, cfg.layernorm_eps, 'norm', dtype)
    out = _routed('inner_attn_ln', ln, shared)(out, split_position)
    out = out.reshape(b, s, n_heads, head_dim)
    out = proj('out_proj', (n_heads, head_dim), (d_model,), ('heads', 'kv', 'embed'))(
        out, split_position)
    out = checkpoint_name(out, 'attention_out')
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

  Attributes:
    config: the model config.
    layer: 0-based index (an int; a traced int scalar when the layer is the body of a scan).
    use_vl: this layer owns the vision-language FFN expert; None: decided from `layer` (the
      top `num_vl_layers` do).
  """
  config: Any
  layer: Any
  use_vl: bool | None = None

  @nn.compact
  def __call__(self, x, split_position, attn_bias, key_padding, deterministic, kv_cache=None,
               return_kv: bool = False):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    rate = drop_path_rate(cfg, self.layer)
    use_vl = self.use_vl
    if use_vl is None:
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


# Remat policy name -> what a rematerialised layer saves for the backward pass (None: nothing
# is rematerialised). The names tag products in `Attention` (jax.ad_checkpoint.checkpoint_name).
REMAT_POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_saveable,
    'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'save_qkv_proj': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj'),
    'save_attention_out': jax.checkpoint_policies.save_only_these_names(
        'query_proj', 'key_proj', 'value_proj', 'attention_out'),
}


class _LayerStep(nn.Module):
  """One layer as the body of `nn.scan`: (x (B, S, D), (layer index, kv cache or None)) ->
  (x, (x, new kv or None)). The layer's parameters sit directly in this module's scope, so the
  stacked tree reads encoder/layers/self_attn/... (no extra level)."""
  config: Any
  use_vl: bool
  split_position: int
  deterministic: bool
  with_kv: bool

  @nn.compact
  def __call__(self, x, per_layer, attn_bias, key_padding):
    layer, kv_cache = per_layer
    inner = EncoderLayer(self.config, layer, self.use_vl)
    nn.share_scope(self, inner)
    if self.with_kv:
      x, kv = inner(x, self.split_position, attn_bias, key_padding, self.deterministic,
                    kv_cache, True)
    else:
      x, kv = inner(x, self.split_position, attn_bias, key_padding, self.deterministic), None
    return x, (x, kv)


class Encoder(nn.Module):
  """torchscale's `encoder`: position tables, padding, the layers, the final Multiway norm.

  Call: token embeddings (B, S, D) in vision-first order, static split position, padding
  (B, S) bool or None, attention mask (S, S) bool/int or None (True/1 = blocked).
  Returns (encoder_out (B, S, D), hidden states: list of depth + 1 arrays (B, S, D), new cache
  or None), always three elements. With `return_hidden=False` the hidden states are only
  [input], so that scanned layers do not keep every layer's output.

  Layers: `depth` `EncoderLayer`s named layers_0 ... (the loop layout), or with
  `config.scan_layers` one `nn.scan` per group of `layer_stack.layer_groups` (params stacked on
  a leading 'layers' axis: encoder/layers/..., encoder/vl_layers/...). Either way each layer
  is rematerialised per `config.remat_policy` (`REMAT_POLICIES`).

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
               text_positions=None, cache=None, return_cache: bool = False,
               return_hidden: bool = True):
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

    policy = REMAT_POLICIES[remat_policy(cfg)]
    hidden = [x]
    new_cache = []
    if cfg.scan_layers:
      for group in layer_stack.layer_groups(cfg):
        step = _LayerStep if policy is None else nn.remat(_LayerStep, policy=policy,
                                                           prevent_cse=False)
        scanned = nn.scan(step, variable_axes={'params': 0},
                          split_rngs={'params': True, 'drop_path': True},
                          in_axes=(0, nn.broadcast, nn.broadcast), length=group.count,
                          metadata_params={nn.PARTITION_NAME: 'layers'})
        index = jnp.arange(group.start, group.start + group.count, dtype=jnp.int32)
        group_cache = None
        if cache is not None:
          group_cache = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *cache[group.start:group.start + group.count])
        x, (outs, kvs) = scanned(cfg, group.use_vl, split_position, deterministic, with_cache,
                                 name=group.name)(x, (index, group_cache), attn_bias,
                                                  key_padding)
        if return_hidden:
          hidden.extend(outs[i] for i in range(group.count))
        if with_cache:
          new_cache.extend(jax.tree.map(lambda a, i=i: a[i], kvs) for i in range(group.count))
    else:
      layer_cls = EncoderLayer
      if policy is not None:
        layer_cls = nn.remat(EncoderLayer, policy=policy,
                             static_argnums=(2, 5, 7) if with_cache else (2, 5))
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

