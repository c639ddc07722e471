"""BEiT-3 with the fine-tuning heads of unilm `beit3/modeling_finetune.py` (same key names).

Every model holds the backbone as `beit3` and its head(s) beside it, so the convert CLI exports
unilm's layout (`beit3.*` + the head keys) and imports it back:

| model | pooling | head params (unilm keys) |
|---|---|---|
| `ImageClassifier` | mean of the patch tokens (CLS excluded) | `fc_norm` LN(D), `head` Linear(D, classes) |
| `NLVR2Classifier` | per image: [vision CLS, first text token]; the pair's two concatenated (4D) | `head.norm1` LN(4D), `head.dense1` 4D->2D, `head.norm2` LN(2D), GELU, `head.dense2` 2D->2 |
| `VQAModel` | `pooler`: vision CLS -> LN -> Linear(D, D) -> tanh | `head.0` Linear(D, 2D), `head.1` LN(2D), GELU, `head.3` Linear(2D, answers) |
| `RetrievalModel` | index 0 of an image-only and a text-only pass | `vision_head`, `language_head` Linear(D, D) without bias; `logit_scale` |
| `CaptioningModel` | text outputs at the chosen positions | `mlm_head` Linear(D, vocab) |

Initialisation as unilm: every Linear TN(0.02) cut at +-1 std with zero bias, LayerNorms 1/0;
the classification `head` and NLVR2's `dense1`/`dense2` (weights and biases) x 0.001;
`logit_scale` = log(1 / 0.07). LayerNorm eps is 1e-5. Outputs are float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit3_jax.models import initializers
from beit3_jax.models.beit3 import BEiT3, example_inputs
from beit3_jax.models.config import num_patches
from beit3_jax.models.layers import LayerNorm, Linear, compute_dtype, l2_normalize

HEAD_EPS = 1e-5


def _tn(scale: float = 1.0):
  return initializers.truncated_normal_1sd(initializers.UNILM_STD, scale)



def head_linear(cfg, d_in: int, d_out: int, axes=('embed', 'mlp'), scale: float = 1.0,
                use_bias: bool = True, name: str | None = None) -> Linear:
  """A head's Linear(d_in, d_out) with unilm's init: TN(0.02) x `scale`, zero bias."""
  return Linear((d_in,), (d_out,), axes, _tn(scale), nn.initializers.zeros,
                compute_dtype(cfg.dtype), use_bias=use_bias, name=name)


def backbone(module: nn.Module, cfg) -> BEiT3:
  """The `beit3` submodule; at init it first sees both modalities, so every expert exists even
  when the task feeds one (classification, the retrieval passes)."""
  backbone = BEiT3(cfg, name='beit3')
  if module.is_initializing():
    backbone(**example_inputs(cfg))
  return backbone


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


class ImageClassifier(nn.Module):
  """images (B, S, S, C) -> logits (B, num_classes). Use a config with normalize_output=False
  (unilm's classification models drop the final norm)."""
  config: Any
  num_classes: int

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    cfg = self.config
    x = backbone(self, cfg)(images=images, deterministic=deterministic)['encoder_out']
    pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    pooled = LayerNorm(HEAD_EPS, name='fc_norm')(pooled)
    head = head_linear(cfg, cfg.embed_dim, self.num_classes, ('embed', 'mlp'), scale=1e-3,
                   name='head')
    return head(pooled).astype(jnp.float32)


class TwoLayerMLP(nn.Module):
  """unilm's `TwoLayerMLP`: norm1 -> dense1 -> norm2 -> GELU -> dense2 (dense x 0.001 init)."""
  config: Any
  in_features: int
  hidden: int
  out_features: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = LayerNorm(HEAD_EPS, name='norm1')(x)
    x = head_linear(cfg, self.in_features, self.hidden, scale=1e-3, name='dense1')(x)
    x = _gelu(LayerNorm(HEAD_EPS, name='norm2')(x))
    return head_linear(cfg, self.hidden, self.out_features, ('mlp', 'embed'), scale=1e-3,
                   name='dense2')(x)


class NLVR2Classifier(nn.Module):
  """(images_a, images_b (B, S, S, C), text_ids (B, L), text_padding_mask) -> logits (B, 2).

  Both images go through one backbone call as a batch of 2B with the text repeated, as unilm does.
  """
  config: Any
  num_classes: int = 2

  @nn.compact
  def __call__(self, images_a, images_b, text_ids, text_padding_mask=None,
               deterministic: bool = True):
    cfg = self.config
    b = images_a.shape[0]
    images = jnp.concatenate([images_a, images_b], axis=0)
    ids = jnp.concatenate([text_ids, text_ids], axis=0)
    pad = None if text_padding_mask is None else jnp.concatenate([text_padding_mask] * 2, 0)
    x = BEiT3(cfg, name='beit3')(images=images, text_ids=ids, text_padding_mask=pad,
                                 deterministic=deterministic)['encoder_out']
    split = 1 + num_patches(cfg)
    cls = jnp.concatenate([x[:, 0], x[:, split]], axis=-1).astype(jnp.float32)   # (2B, 2D)
    pair = jnp.concatenate([cls[:b], cls[b:]], axis=-1)                          # (B, 4D)
    d = cfg.embed_dim
    return TwoLayerMLP(cfg, 4 * d, 2 * d, self.num_classes, name='head')(pair).astype(
        jnp.float32)


class Pooler(nn.Module):
  """unilm's `Pooler`: LN -> Linear(D, D) -> tanh on the vision CLS."""
  config: Any

  @nn.compact
  def __call__(self, cls):
    cfg = self.config
    x = LayerNorm(HEAD_EPS, name='norm')(cls)
    return jnp.tanh(head_linear(cfg, cfg.embed_dim, cfg.embed_dim, name='dense')(x))


class VQAHead(nn.Module):
  """unilm's `head` Sequential: 0 Linear(D, 2D), 1 LN(2D), 2 GELU, 3 Linear(2D, answers)."""
  config: Any
  num_answers: int

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d = cfg.embed_dim
    x = head_linear(cfg, d, 2 * d, name='layers_0')(x)
    x = _gelu(LayerNorm(HEAD_EPS, name='layers_1')(x))
    return head_linear(cfg, 2 * d, self.num_answers, ('mlp', 'vocab'), name='layers_3')(x)


class VQAModel(nn.Module):
  """(images, text_ids, text_padding_mask) -> answer logits (B, num_answers) (3129 in VQAv2).
  Use a config with normalize_output=False (as unilm's VQA models)."""
  config: Any
  num_answers: int = 3129

  @nn.compact
  def __call__(self, images, text_ids, text_padding_mask=None, deterministic: bool = True):
    x = BEiT3(self.config, name='beit3')(images=images, text_ids=text_ids,
                                         text_padding_mask=text_padding_mask,
                                         deterministic=deterministic)['encoder_out']
    pooled = Pooler(self.config, name='pooler')(x[:, 0].astype(jnp.float32))
    return VQAHead(self.config, self.num_answers, name='head')(pooled).astype(jnp.float32)


class RetrievalModel(nn.Module):
  """Image-only and text-only passes -> l2-normalised features (B, D) float32, and logit_scale.

  Call with images, or text_ids (+ text_padding_mask), or both; returns a dict with
  'image_features', 'text_features' (those computed) and 'logit_scale' (the raw parameter;
  the similarity scale is its exp, not clamped, as unilm).
  """
  config: Any

  @nn.compact
  def __call__(self, images=None, text_ids=None, text_padding_mask=None,
               deterministic: bool = True):
    cfg = self.config
    beit3 = backbone(self, cfg)
    vision_head = head_linear(cfg, cfg.embed_dim, cfg.embed_dim, use_bias=False, name='vision_head')
    language_head = head_linear(cfg, cfg.embed_dim, cfg.embed_dim, use_bias=False,
                            name='language_head')
    scale = self.param('logit_scale', nn.with_logical_partitioning(
        lambda *_: jnp.full((), math.log(1 / 0.07), jnp.float32), ()), ())
    out = {'logit_scale': scale}
    if self.is_initializing():
      vision_head(jnp.zeros((1, cfg.embed_dim), jnp.float32))
      language_head(jnp.zeros((1, cfg.embed_dim), jnp.float32))
    if images is not None:
      x = beit3(images=images, deterministic=deterministic)['encoder_out'][:, 0]
      out['image_features'] = l2_normalize(vision_head(x).astype(jnp.float32))
    if text_ids is not None:
      x = beit3(text_ids=text_ids, text_padding_mask=text_padding_mask,
                   deterministic=deterministic)['encoder_out'][:, 0]
      out['text_features'] = l2_normalize(language_head(x).astype(jnp.float32))
    return out


class CaptioningModel(nn.Module):
  """(images, text_ids, text_padding_mask, attn_mask, text_index (B, K)) -> logits (B, K, vocab)
  of the text positions in `text_index` (the masked ones in training)."""
  config: Any

  @nn.compact
  def __call__(self, images, text_ids, text_index, text_padding_mask=None, attn_mask=None,
               deterministic: bool = True):
    cfg = self.config
    x = BEiT3(cfg, name='beit3')(images=images, text_ids=text_ids,
                                 text_padding_mask=text_padding_mask, attn_mask=attn_mask,
                                 deterministic=deterministic)['encoder_out']
    text = x[:, x.shape[1] - text_ids.shape[1]:]
    picked = jnp.take_along_axis(text, text_index[..., None].astype(jnp.int32), axis=1)
    head = head_linear(cfg, cfg.embed_dim, cfg.vocab_size, ('embed', 'vocab'), name='mlm_head')
    return head(picked).astype(jnp.float32)
