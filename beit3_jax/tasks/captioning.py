"""Caption generation with a key/value cache (unilm BEiT-3 / s2s-ft incremental decoding).

A `beit3_jax.models.heads.CaptioningModel` (backbone `beit3` + `mlm_head`) is trained with the
captioning attention mask (`captioning_attn_mask`): image tokens see the image, text tokens see
the image and the earlier text (and themselves). A caption is decoded left to right by feeding
[last token, MASK]: the logits at the MASK give the next token.

Here the image pass (image only, which equals the image part of any joint pass, since image
tokens never see text) builds the cache; each step then feeds the text-only pair
[token_t, MASK] at explicit text positions (t, t + 1) (position ids t + 2, t + 3), attends to
the cache plus the pair under the last two rows of the full captioning mask, and keeps only
token_t's keys/values in the cache (the MASK's are dropped). Step 0 feeds [BOS, MASK].

For `beit3_jax.tasks.decoding` (fixed shapes under `lax.fori_loop`) the cache is a buffer of
1 + N_p + max_len slots per layer: image keys/values first, then slot 1 + N_p + t receives
token_t's; slots not yet written are blocked by the attention mask (-1e8, i.e. weight 0).

This is exact only for configs without the vision-language expert (num_vl_layers == 0, the
released base/large): the text-only steps route through the language expert B, as torchscale.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.models.beit3 import BEiT3
from beit3_jax.models.config import num_patches
from beit3_jax.models.embeddings import POSITION_OFFSET
from beit3_jax.models.heads import _linear
from beit3_jax.tasks import decoding


def captioning_attn_mask(num_image_tokens: int, text_len: int) -> np.ndarray:
  """(S, S) int32 0/1, 1 = blocked, S = num_image_tokens + text_len: image rows see only the
  image; text rows see the image and text up to and including themselves."""
  s = num_image_tokens + text_len
  mask = np.zeros((s, s), np.int32)
  mask[:num_image_tokens, num_image_tokens:] = 1
  mask[num_image_tokens:, num_image_tokens:] = np.triu(np.ones((text_len, text_len), np.int32), 1)
  return mask


class CaptionDecoder(nn.Module):
  """The CaptioningModel's parameters (`beit3`, `mlm_head`) applied step by step.

  `image_pass(images)` -> cache (tuple of depth dicts {'key', 'value'} (B, 1 + N_p, H, d)).
  `__call__(text_ids (B, L), text_positions (B, L), attn_mask (L, S_cache + L), cache)` ->
  (logits (B, L, vocab) float32, new_cache).
  """
  config: Any

  def setup(self):
    cfg = self.config
    self.beit3 = BEiT3(cfg)
    self.mlm_head = _linear(cfg, cfg.embed_dim, cfg.vocab_size, ('embed', 'vocab'))

  def image_pass(self, images):
    return self.beit3(images=images, return_cache=True)['new_cache']

  def __call__(self, text_ids, text_positions, attn_mask, cache):
    out = self.beit3(text_ids=text_ids, text_positions=text_positions, attn_mask=attn_mask,
                     cache=cache)
    return self.mlm_head(out['encoder_out']).astype(jnp.float32), out['new_cache']


def _check(config, max_len: int):
  if config.num_vl_layers:
    raise ValueError('cached captioning needs num_vl_layers == 0 (a text-only step routes to '
                     'expert B, the joint pass to the vision-language expert C).')
  longest = config.max_text_positions - POSITION_OFFSET
  if max_len + 1 > longest:
    raise ValueError(f'max_len={max_len} needs {max_len + 1} text positions (bos + tokens), the '
                     f'table allows {longest}.')


def _decoder(model_or_config) -> CaptionDecoder:
  config = getattr(model_or_config, 'config', model_or_config)
  return CaptionDecoder(config)


def init_caption_state(model, params, images, max_len: int):
  """The image pass: the decoding state for `caption_step_fn` (B rows).

  Args:
    model: a CaptioningModel (or its config).
    params: the CaptioningModel's params ({'beit3': ..., 'mlm_head': ...}).
    images: (B, S, S, C) float, normalised.
    max_len: static, the most generated tokens.

  Returns:
    {'cache': tuple of depth dicts {'key', 'value'} (B, 1 + N_p + max_len, H, d)}, image
    keys/values in the first 1 + N_p slots, zeros after.
  """
  dec = _decoder(model)
  _check(dec.config, max_len)
  cache = dec.apply({'params': params}, images, method=CaptionDecoder.image_pass)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, max_len), (0, 0), (0, 0)))
  return {'cache': jax.tree.map(pad, cache)}


def caption_step_fn(model, params, mask_id):
  """The `decoding` step function for a CaptioningModel with a key/value cache.

  step_fn(state, token_ids (N,), position) -> (log_probs (N, V) of the token at position + 1,
  new_state): feeds [token_ids, MASK] at text positions (position, position + 1) against the
  cached image + earlier tokens, and writes token_ids' keys/values into the cache slot
  1 + N_p + position. Start from `init_caption_state` (position 0 feeds the bos).
  """
  dec = _decoder(model)
  n_img = 1 + num_patches(dec.config)

  def step_fn(state, token_ids, position):
    cache = state['cache']
    n = token_ids.shape[0]
    slots = cache[0]['key'].shape[1]  # n_img + max_len
    position = jnp.asarray(position, jnp.int32)
    mask_col = jnp.full((n,), mask_id, jnp.int32)
    text_ids = jnp.stack([token_ids.astype(jnp.int32), mask_col], axis=1)
    text_positions = jnp.broadcast_to(position + jnp.arange(2, dtype=jnp.int32), (n, 2))
    # Last two rows of the full mask over [cache slots | token | MASK]; unwritten slots blocked.
    cached_ok = jnp.arange(slots) < n_img + position
    blocked_cache = jnp.broadcast_to(~cached_ok, (2, slots))
    blocked_new = jnp.array([[False, True], [False, False]])
    attn_mask = jnp.concatenate([blocked_cache, blocked_new], axis=1)
    logits, new_cache = dec.apply({'params': params}, text_ids, text_positions, attn_mask, cache)

    def write(buf, new):  # new: (N, slots + 2, H, d); keep the token's, drop the MASK's
      token_kv = jax.lax.dynamic_slice_in_dim(new, slots, 1, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(buf, token_kv.astype(buf.dtype),
                                                 n_img + position, axis=1)

    cache = jax.tree.map(write, cache, new_cache)
    return jax.nn.log_softmax(logits[:, 1], axis=-1), {'cache': cache}

  return step_fn


def generate_captions(params, config, images, bos_id, eos_id, pad_id, mask_id, max_len: int,
                      beam_size: int = 1, length_penalty=0.6, *, return_scores: bool = False):
  """Captions for `images` (B, S, S, C) with a CaptioningModel's params.

  beam_size=1: greedy search; else beam search (score = log-prob / length ** length_penalty).
  Returns tokens (B, max_len) int32 (the best hypothesis, without the bos, pad after the eos),
  and with `return_scores=True` also scores (B,) float32: log-prob / length ** length_penalty
  (beam search's score; for greedy computed by `decoding.sequence_log_prob`).
  """
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f'beam_size must be an int >= 1, got {beam_size!r}')
  _check(config, max_len)
  run = _generator(config, max_len, beam_size, return_scores)
  ids = jnp.asarray([bos_id, eos_id, pad_id, mask_id], jnp.int32)
  tokens, scores = run(params, jnp.asarray(images), ids,
                       jnp.asarray(length_penalty, jnp.float32))
  return (tokens, scores) if return_scores else tokens


_GENERATORS: dict = {}


def _generator(config, max_len: int, beam_size: int, return_scores: bool):
  """The jitted decoding function of one (config, max_len, beam size), built once per process
  (so repeated calls, e.g. batch after batch in evaluation, compile once per input shape)."""
  key = (config.to_json(), max_len, beam_size, return_scores)
  if key in _GENERATORS:
    return _GENERATORS[key]
  dec = CaptionDecoder(config)

  @jax.jit
  def run(params, images, ids, length_penalty):
    bos, eos, pad, mask = ids[0], ids[1], ids[2], ids[3]
    state = init_caption_state(dec, params, images, max_len)
    step = caption_step_fn(dec, params, mask)
    if beam_size == 1:
      tokens = decoding.greedy_decode(step, state, bos, eos, pad, max_len)
      if not return_scores:
        return tokens, jnp.zeros(tokens.shape[:1], jnp.float32)
      scores = decoding.sequence_log_prob(step, state, tokens, bos, eos, length_penalty)
      return tokens, scores
    tokens, scores = decoding.beam_search(step, state, bos, eos, pad, max_len, beam_size,
                                          length_penalty)
    return tokens[:, 0], scores[:, 0]

  _GENERATORS[key] = run
  return run
