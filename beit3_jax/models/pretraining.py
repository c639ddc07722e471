"""BEiT-3 with its pretraining heads: masked image modeling and masked language modeling.

Parameter tree (unilm key names, so the convert CLI exports `beit3.*`, `mim_head.*` and
`mlm_head.*`):

    beit3/...            the backbone (`BEiT3`)
    mim_head/kernel      (D, codebook_size)   logical ('embed', 'codebook')
    mim_head/bias        (codebook_size,)
    mlm_head/kernel      (D, vocab_size)      logical ('embed', 'vocab')
    mlm_head/bias        (vocab_size,)

The heads run only on the positions a loss is computed on (gathered by index), never on the
whole sequence: with a 64k vocabulary the MLM head over all text positions would cost about
as much as the backbone.
"""

from __future__ import annotations

from typing import Any, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit3_jax.models import initializers
from beit3_jax.models.beit3 import BEiT3, example_inputs
from beit3_jax.models.config import num_patches
from beit3_jax.models.layers import Linear, compute_dtype


def gather_positions(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (B, S, D), index (B, K) int -> (B, K, D): x[b, index[b, k]]."""
  return jnp.take_along_axis(x, index[..., None].astype(jnp.int32), axis=1)


class PretrainingOutput(TypedDict):
  """What `BEiT3Pretraining` returns: a plain dict with always these keys (see there)."""
  encoder_out: jax.Array
  mim_logits: jax.Array | None
  mlm_logits: jax.Array | None


class BEiT3Pretraining(nn.Module):
  """The backbone and the two pretraining heads.

  Call with the backbone's inputs (see `BEiT3`) plus
    image_index: (B, K_i) int32, patch indices (0 .. N_p - 1) whose MIM logits to return.
    text_index:  (B, K_t) int32, text positions (0 .. L - 1) whose MLM logits to return.
  Returns a `PretrainingOutput`: a dict with always the same three keys, whatever the inputs:

    encoder_out: (B, S, D) in the compute dtype (config.dtype), the backbone's output.
    mim_logits:  (B, K_i, codebook_size) float32 when images and image_index are given;
                 None otherwise.
    mlm_logits:  (B, K_t, vocab_size) float32 when text_ids and text_index are given;
                 None otherwise.

  Attributes:
    config: the backbone's model config.
    codebook_size: outputs of `mim_head` (the visual tokenizer's codebook entries).
  """
  config: Any
  codebook_size: int

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    init = initializers.truncated_normal_1sd(initializers.UNILM_STD)
    zeros = nn.initializers.zeros
    self.beit3 = BEiT3(cfg)
    self.mim_head = Linear((cfg.embed_dim,), (self.codebook_size,), ('embed', 'codebook'), init,
                           zeros, dtype)
    self.mlm_head = Linear((cfg.embed_dim,), (cfg.vocab_size,), ('embed', 'vocab'), init, zeros,
                           dtype)

  def __call__(self, text_ids=None, text_padding_mask=None, images=None, image_mask=None, *,
               image_index=None, text_index=None, deterministic: bool = True):
    out = self.beit3(text_ids=text_ids, text_padding_mask=text_padding_mask, images=images,
                     image_mask=image_mask, deterministic=deterministic)
    x = out['encoder_out']
    mim_logits = mlm_logits = None
    if images is not None and image_index is not None:
      patches = x[:, 1:1 + num_patches(self.config)]
      mim_logits = self.mim_head(gather_positions(patches, image_index)).astype(jnp.float32)
    if text_ids is not None and text_index is not None:
      text = x[:, x.shape[1] - text_ids.shape[1]:]
      mlm_logits = self.mlm_head(gather_positions(text, text_index)).astype(jnp.float32)
    return PretrainingOutput(encoder_out=x, mim_logits=mim_logits, mlm_logits=mlm_logits)


def pretraining_example_inputs(config) -> dict:
  """Inputs that create every parameter (both modalities, both heads)."""
  inputs = example_inputs(config)
  inputs['image_index'] = jnp.zeros((1, 1), jnp.int32)
  inputs['text_index'] = jnp.zeros((1, 1), jnp.int32)
  return inputs
