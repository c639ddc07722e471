"""The BEiT-3 backbone: embeddings, static Multiway routing, the encoder (torchscale `BEiT3`)."""

from __future__ import annotations

from typing import Any, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.models.config import num_patches
from beit3_jax.models.embeddings import POSITION_OFFSET, TextEmbedding, VisionEmbedding
from beit3_jax.models.encoder import Encoder
from beit3_jax.models.layers import TEXT_ONLY, VISION_ONLY, compute_dtype


def split_position(config, has_images: bool, has_text: bool) -> int:
  """Static Multiway split: -1 image only, 0 text only, 1 + N_p for image + text."""
  if has_images and has_text:
    return 1 + num_patches(config)
  if has_images:
    return VISION_ONLY
  if has_text:
    return TEXT_ONLY
  raise ValueError('BEiT3 needs images, text_ids or both.')


class BEiT3Output(TypedDict):
  """What `BEiT3` returns: a plain dict with always these keys (see `BEiT3`)."""
  encoder_out: jax.Array
  split_position: int
  hidden_states: jax.Array | None
  new_cache: tuple[dict[str, jax.Array], ...] | None


class BEiT3(nn.Module):
  """The BEiT-3 Multiway Transformer (torchscale 0.3.0 `BEiT3`, same parameter names).

  Call `model.apply({'params': params}, text_ids=None, text_padding_mask=None, images=None,
  image_mask=None, attn_mask=None, deterministic=True, return_hidden_states=False,
  rngs={'drop_path': key})` with

    text_ids:          (B, L) int32 token ids, L <= max_text_positions - 2.
    text_padding_mask: (B, L) bool, True = padding. Padded keys are never attended to, and the
                       padded inputs are zeroed after the position embedding. A row that is
                       all padding (text only) attends uniformly over its padded keys: its
                       outputs are finite but meaningless (torchscale gives NaN there).
    images:            (B, img_size, img_size, in_chans) float (NHWC), normalised by the caller.
    image_mask:        (B, N_p) bool, True = the patch is replaced by the mask token.
    attn_mask:         (S, S) bool or 0/1 int, True/1 = query row may not attend to key column;
                       shared by the batch and heads; added as -1e8 to the logits.
    deterministic:     False turns on drop path (rng collection 'drop_path').
    text_positions:    (B, L) int, explicit 0-based text positions (table row = index + 2, as
                       torchscale's `positions`); default 0 .. L - 1. For incremental decoding.
    cache:             key/value cache of earlier tokens (torchscale's `incremental_state`): a
                       sequence of `depth` dicts {'key', 'value'} (B, S_cache, H, d), prepended
                       to each layer's keys/values. attn_mask is then (S, S_cache + S) (rows =
                       this call's tokens, columns = cached then new keys), cached keys are
                       never padding, and the output's `new_cache` is the same structure (a
                       tuple) with this call's keys/values appended (B, S_cache + S, H, d).
                       Routing and positions of the new tokens are those of this call alone
                       (a text-only step uses expert B, as torchscale's split position 0), so
                       a cached run equals the full run only with num_vl_layers == 0.
    return_cache:      True returns `new_cache` (this call's keys/values) without a cache.

  The sequence is vision first: [CLS, N_p patches, L text tokens]. Image only routes every
  Multiway module to expert A, text only to B, image + text splits at 1 + N_p (returned as
  `split_position`; -1 / 0 for the one-modality cases). This gives at most three compiled
  variants per input shape.

  Returns a `BEiT3Output`: a dict with always the same four keys, whatever the flags:

    encoder_out:    (B, S, D) in the compute dtype (config.dtype), after the final norm.
    split_position: int (static), the Multiway split: -1 image only, 0 text only, 1 + N_p
                    image + text.
    hidden_states:  (depth + 1, B, S, D) in the compute dtype with `return_hidden_states=True`
                    (the input of the first layer and the output of every layer, before the
                    final norm); None otherwise.
    new_cache:      with a `cache` or `return_cache=True`, a tuple of `depth` dicts
                    {'key', 'value'}, each (B, S_cache + S, H, d) in the compute dtype
                    (S_cache = 0 without a cache); None otherwise.

  `model.init` must see both images and text_ids, so that every parameter is created
  (`beit3_jax.models.init_params` does this).
  """
  config: Any

  @nn.compact
  def __call__(self, text_ids=None, text_padding_mask=None, images=None, image_mask=None,
               attn_mask=None, deterministic: bool = True, return_hidden_states: bool = False,
               text_positions=None, cache=None, return_cache: bool = False):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    created = 'text_embed' in self.variables.get('params', {})  # a second call during init
    if self.is_initializing() and (images is None or text_ids is None) and not created:
      raise ValueError('Initialise BEiT3 with both images and text_ids so that every parameter '
                       'is created (see beit3_jax.models.init_params).')
    cache_len = 0 if cache is None else int(cache[0]['key'].shape[1])
    check_inputs(cfg, text_ids, text_padding_mask, images, image_mask, attn_mask,
                 text_positions=text_positions, cache_len=cache_len)

    parts = []
    if images is not None:
      parts.append(VisionEmbedding(cfg.patch_size, cfg.in_chans, cfg.embed_dim, dtype,
                                   name='vision_embed')(images, image_mask))
    if text_ids is not None:
      parts.append(TextEmbedding(cfg.vocab_size, cfg.embed_dim, dtype, name='text_embed')(
          text_ids))
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    split = split_position(cfg, images is not None, text_ids is not None)

    padding_mask = None
    if text_padding_mask is not None:
      text_pad = jnp.asarray(text_padding_mask).astype(bool)
      if images is not None:
        text_pad = jnp.concatenate(
            [jnp.zeros((text_pad.shape[0], split), bool), text_pad], axis=1)
      padding_mask = text_pad

    if text_positions is not None:
      text_positions = jnp.asarray(text_positions).astype(jnp.int32)
    out, hidden, new_cache = Encoder(cfg, name='encoder')(
        x, split, padding_mask, attn_mask, deterministic, text_positions, cache, return_cache,
        return_hidden_states)
    return BEiT3Output(encoder_out=out, split_position=split,
                       hidden_states=jnp.stack(hidden) if return_hidden_states else None,
                       new_cache=new_cache)


def check_inputs(cfg, text_ids, text_padding_mask, images, image_mask, attn_mask, *,
                 text_positions=None, cache_len: int = 0) -> int:
  """Raises ValueError naming the first input whose shape or dtype is wrong; returns B.

  With a cache of `cache_len` tokens, attn_mask must be (S, cache_len + S)."""
  if images is None and text_ids is None:
    raise ValueError('BEiT3 needs images, text_ids or both.')
  batch = None
  seq_len = 0
  if images is not None:
    expect = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expect:
      raise ValueError(f'images must be (B, {expect[0]}, {expect[1]}, {expect[2]}) NHWC for '
                       f'img_size={cfg.img_size}, got {tuple(images.shape)}. Resize the images '
                       'or build the model with get_config(..., img_size=...) and '
                       'resize_vision_positions().')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'images must be float, got {images.dtype}.')
    batch = images.shape[0]
    seq_len += 1 + num_patches(cfg)
    if image_mask is not None and tuple(image_mask.shape) != (batch, num_patches(cfg)):
      raise ValueError(f'image_mask must be (B, N_p) = ({batch}, {num_patches(cfg)}), '
                       f'got {tuple(image_mask.shape)}.')
  elif image_mask is not None:
    raise ValueError('image_mask given without images.')
  if text_ids is not None:
    if text_ids.ndim != 2:
      raise ValueError(f'text_ids must be (B, L), got {tuple(text_ids.shape)}.')
    if not jnp.issubdtype(text_ids.dtype, jnp.integer):
      raise ValueError(f'text_ids must be integer token ids, got {text_ids.dtype}.')
    longest = cfg.max_text_positions - POSITION_OFFSET
    if text_ids.shape[1] > longest:
      raise ValueError(f'text_ids has length {text_ids.shape[1]}, but the text position table '
                       f'(max_text_positions={cfg.max_text_positions}) allows at most {longest} '
                       'tokens; truncate the text.')
    if batch is not None and text_ids.shape[0] != batch:
      raise ValueError(f'text_ids batch {text_ids.shape[0]} != images batch {batch}.')
    batch = text_ids.shape[0]
    seq_len += text_ids.shape[1]
    if text_padding_mask is not None and tuple(text_padding_mask.shape) != tuple(text_ids.shape):
      raise ValueError(f'text_padding_mask must have the shape of text_ids '
                       f'{tuple(text_ids.shape)}, got {tuple(text_padding_mask.shape)}.')
    if text_positions is not None:
      if tuple(np.shape(text_positions)) != tuple(text_ids.shape):
        raise ValueError(f'text_positions must have the shape of text_ids '
                         f'{tuple(text_ids.shape)}, got {tuple(np.shape(text_positions))}.')
      if not jnp.issubdtype(jnp.asarray(text_positions).dtype, jnp.integer):
        raise ValueError('text_positions must be integer.')
  elif text_padding_mask is not None:
    raise ValueError('text_padding_mask given without text_ids.')
  elif text_positions is not None:
    raise ValueError('text_positions given without text_ids.')
  n_keys = cache_len + seq_len
  if attn_mask is not None and tuple(np.shape(attn_mask)) != (seq_len, n_keys):
    what = '(S, S)' if not cache_len else '(S, S_cache + S)'
    raise ValueError(f'attn_mask must be {what} = ({seq_len}, {n_keys}) for this input, '
                     f'got {tuple(np.shape(attn_mask))}.')
  return batch


def example_inputs(config, batch_size: int = 1, text_len: int = 8) -> dict:
  """Zero inputs of both modalities (what `init_params` traces with)."""
  return {
      'images': jnp.zeros((batch_size, config.img_size, config.img_size, config.in_chans),
                          jnp.float32),
      'text_ids': jnp.zeros((batch_size, text_len), jnp.int32),
  }


def init_params(config, rng: jax.Array, *, boxed: bool = False):
  """Initialises the backbone's parameters (float32) on the default device.

  With `boxed=True` the leaves stay `nn.LogicallyPartitioned` (they carry their logical axis
  names); otherwise plain arrays. For params born sharded over a mesh use
  `beit3_jax.sharding.init_sharded`.
  """
  model = BEiT3(config)
  params = jax.jit(lambda r: model.init(r, **example_inputs(config))['params'])(rng)
  return params if boxed else nn.meta.unbox(params)


def abstract_params(config, *, boxed: bool = True):
  """Shapes and dtypes of the parameters (jax.ShapeDtypeStruct leaves), without allocating."""
  model = BEiT3(config)
  variables = jax.eval_shape(lambda r: model.init(r, **example_inputs(config)),
                             jax.random.key(0))
  params = variables['params']
  return params if boxed else nn.meta.unbox(params)


def count_params(params) -> int:
  """Total number of parameter elements of a (boxed or plain, real or abstract) tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(params))
  return int(sum(np.prod(x.shape) for x in leaves))
