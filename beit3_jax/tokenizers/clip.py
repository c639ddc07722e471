"""The CLIP vision tower (OpenAI's `VisionTransformer`) in Flax linen: a VQ-KD teacher.

BEiT v2 distils CLIP ViT-B/16 into its VQ-KD tokenizer (unilm `beit2/modeling_vqkd.py`,
`VQKD.get_regress_target`, teacher `beit2/vqkd_teacher/clip/model.py`). Its regression target
for an image x in [-1, 1] (the tokenizer's own input, 224 px, the same crop) is

    x' = (clamp((x + 1) * 127.5, 0, 255) / 255 - CLIP_MEAN) / CLIP_STD     (`to_clip_input`)
    h  = transformer(ln_pre(concat(class_embedding, conv1(x')) + positional_embedding))
    target = ln_post(h)[:, 1:] @ proj                    (B, 196, 512)   (`patch_features`)

i.e. every patch token of the last block (the CLS token dropped), after `ln_post`, projected by
`proj` into CLIP's 512-d joint space, in float32 (clip.load(device='cpu') casts the model to
float32). Blocks are pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)), mlp = c_fc -> QuickGELU
(x sigmoid(1.702 x)) -> c_proj; attention is torch `nn.MultiheadAttention` (fused in_proj with
bias, q scaled by d**-0.5 after its bias). LayerNorm eps 1e-5 (torch's default).

Parameters (names follow OpenAI's `visual.*` state dict, so `clip_convert` maps them by rule):

| Flax path                                   | shape         | logical axes                  |
|---------------------------------------------|---------------|-------------------------------|
| `conv1/kernel` (no bias)                    | (P, P, 3, D)  | patch_h, patch_w, channels, embed |
| `class_embedding`                           | (D,)          | embed                         |
| `positional_embedding`                      | (1 + g*g, D)  | posemb, embed                 |
| `ln_pre`, `ln_post`, `.../ln_1`, `.../ln_2` | scale, bias (D,) | norm                       |
| `transformer/resblocks_{i}/attn/qkv/kernel` | (D, 3, H, d)  | embed, -, heads, kv           |
| `.../attn/qkv/bias`                         | (3, H, d)     | -, heads, kv                  |
| `.../attn/out_proj/{kernel,bias}`           | (H, d, D), (D,) | heads, kv, embed            |
| `.../mlp/c_fc/{kernel,bias}`                | (D, F), (F,)  | embed, mlp                    |
| `.../mlp/c_proj/{kernel,bias}`              | (F, D), (D,)  | mlp, embed                    |
| `proj` (if projection_dim > 0)              | (D, E)        | embed, teacher                |

with g = image_size // patch_size. A random init (for shapes and tests only; a teacher is always
converted weights) draws the embeddings and `proj` from N(0, D**-0.5) like OpenAI's constructor
and the linear kernels from N(0, 0.02).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from beit3_jax.models import flops as flops_lib
from beit3_jax.models import initializers
from beit3_jax.models.attention import dot_product_attention
from beit3_jax.models.layers import LayerNorm, Linear, compute_dtype, constrain

ClipVisionConfig = ml_collections.ConfigDict

# OpenAI CLIP's image normalisation (clip.py `_transform`; beit2 `ScalingLayerForClip`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DEFAULTS = dict(
    image_size=224,        # the side the weights were trained on: (image_size // patch)**2 + 1
                           # position rows; inputs must have this size.
    patch_size=16,
    width=768,             # D
    layers=12,
    heads=12,              # OpenAI: width // 64
    mlp_dim=3072,          # F = 4 D
    projection_dim=512,    # E, the columns of `proj`; 0 = no projection (features are D wide).
    layernorm_eps=1e-5,
    activation='quick_gelu',   # or 'gelu' (exact), for towers trained with it.
    dtype='float32',       # compute dtype; LayerNorm and softmax run in float32.
)

VARIANTS: dict[str, dict] = {
    'vit_b16': {},   # OpenAI ViT-B/16: BEiT v2's teacher.
    'vit_l14': dict(patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
                    projection_dim=768),
}
ACTIVATIONS = ('quick_gelu', 'gelu')
DTYPES = ('float32', 'bfloat16')
ACT = ('batch', 'length', 'embed')
_INIT_STD = 0.02


def get_clip_config(variant: str = 'vit_b16', **overrides) -> ml_collections.ConfigDict:
  """The locked config of a named CLIP vision tower (`VARIANTS`), with `overrides` applied.

  Raises:
    KeyError: unknown variant or field (named in the message).
    ValueError: inconsistent values (the field is named).
  """
  if variant not in VARIANTS:
    raise KeyError(f'Unknown CLIP variant {variant!r}; known: {sorted(VARIANTS)}.')
  fields = dict(_DEFAULTS)
  fields.update(VARIANTS[variant])
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f'Unknown CLIP config field(s) {unknown}; known fields: {sorted(fields)}.')
  fields.update(overrides)
  config = ml_collections.ConfigDict(fields)
  config.variant = variant
  validate_clip_config(config)
  config.lock()
  return config


def validate_clip_config(config) -> None:
  """Raises ValueError naming the first inconsistent field of a CLIP tower config."""
  for field in ('image_size', 'patch_size', 'width', 'layers', 'heads', 'mlp_dim'):
    if int(config[field]) < 1:
      raise ValueError(f'CLIP config: {field}={config[field]} must be >= 1.')
  if config.image_size % config.patch_size:
    raise ValueError(f'CLIP config: image_size={config.image_size} is not a multiple of '
                     f'patch_size={config.patch_size}.')
  if config.width % config.heads:
    raise ValueError(f'CLIP config: width={config.width} is not divisible by '
                     f'heads={config.heads}.')
  if config.projection_dim < 0:
    raise ValueError(f'CLIP config: projection_dim={config.projection_dim} must be >= 0.')
  if config.activation not in ACTIVATIONS:
    raise ValueError(f'CLIP config: activation={config.activation!r}; expected one of '
                     f'{ACTIVATIONS}.')
  if config.dtype not in DTYPES:
    raise ValueError(f'CLIP config: dtype={config.dtype!r}; expected one of {DTYPES}.')


def feature_size(config) -> int:
  """The last axis of `patch_features`: projection_dim, or width without a projection."""
  return int(config.projection_dim or config.width)


def to_clip_input(images: jax.Array) -> jax.Array:
  """Tokenizer images in [-1, 1] -> CLIP's normalised input, as beit2's `ScalingLayerForClip`.

  Args:
    images: (..., 3) float, channels last, in [-1, 1] (`image_ops.tokenizer_view`).

  Returns:
    float32 of the same shape: (clip((x + 1) * 127.5, 0, 255) / 255 - CLIP_MEAN) / CLIP_STD.
  """
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


# ----------------------------------------------------------------------------- modules


def _activation(name: str, x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class PatchConv(nn.Module):
  """OpenAI's `conv1`, Conv2d(3, D, kernel = stride = P, no bias), as one matmul over patches.

  (B, H, W, 3) -> (B, (H / P) (W / P), D), patches in row-major order. Parameter `kernel`
  (P, P, 3, D) = torch's weight (D, 3, P, P) transposed.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, d = self.patch_size, self.width
    kernel = self.param('kernel', nn.with_logical_partitioning(
        initializers.normal(_INIT_STD), ('patch_h', 'patch_w', 'channels', 'embed')),
        (p, p, 3, d), jnp.float32)
    b, h, w, _ = images.shape
    patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, 3)
    x = jnp.einsum('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype))
    return x.reshape(b, (h // p) * (w // p), d)


class Attention(nn.Module):
  """torch `nn.MultiheadAttention` self-attention: (B, S, D) -> (B, S, D), softmax in float32.

  `qkv` = its `in_proj_weight`/`in_proj_bias` as a kernel (D, 3, H, d) and bias (3, H, d);
  `out_proj` (H, d, D) and (D,).
  """
  width: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, h = self.width, self.heads
    hd = d // h
    init, zeros = initializers.normal(_INIT_STD), nn.initializers.zeros
    qkv = Linear((d,), (3, h, hd), ('embed', None, 'heads', 'kv'), init, zeros, self.dtype,
                 name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = constrain(q * jnp.asarray(hd ** -0.5, self.dtype), ('batch', 'length', 'heads', 'kv'))
    out = dot_product_attention(q, k, v)
    return Linear((h, hd), (d,), ('heads', 'kv', 'embed'), init, zeros, self.dtype,
                  name='out_proj')(out)


class Mlp(nn.Module):
  """c_fc -> QuickGELU (or exact GELU), in float32 -> c_proj."""
  width: int
  mlp_dim: int
  activation: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, f = self.width, self.mlp_dim
    init, zeros = initializers.normal(_INIT_STD), nn.initializers.zeros
    h = Linear((d,), (f,), ('embed', 'mlp'), init, zeros, self.dtype, name='c_fc')(x)
    h = constrain(_activation(self.activation, h).astype(self.dtype), ('batch', 'length', 'mlp'))
    return Linear((f,), (d,), ('mlp', 'embed'), init, zeros, self.dtype, name='c_proj')(h)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)): (B, S, D) -> (B, S, D)."""
  width: int
  heads: int
  mlp_dim: int
  eps: float
  activation: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ln = functools.partial(LayerNorm, self.eps, 'norm', self.dtype)
    x = x + Attention(self.width, self.heads, self.dtype, name='attn')(ln(name='ln_1')(x))
    x = x + Mlp(self.width, self.mlp_dim, self.activation, self.dtype, name='mlp')(
        ln(name='ln_2')(x))
    return constrain(x, ACT)


class Transformer(nn.Module):
  """`layers` blocks `resblocks_{i}`: (B, S, D) -> (B, S, D)."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  eps: float
  activation: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.width, self.heads, self.mlp_dim, self.eps, self.activation,
                                 self.dtype, name=f'resblocks_{i}')(x)
    return x


class ClipVisionTower(nn.Module):
  """CLIP's image encoder. Call its methods with `model.apply({'params': p}, x, method=...)`.

  `images` are (B, S, S, 3) float, channels last, S = config.image_size, already normalised
  (`to_clip_input`); N = (S / P)**2 patches in row-major order.

  Methods:
    encode(images) -> (B, 1 + N, D): the last block's output, CLS first, before `ln_post`
      (transformers' `last_hidden_state`).
    patch_features(images) -> (B, N, E) float32: ln_post(encode(images))[:, 1:] @ proj (E = D
      without a projection): BEiT v2's VQ-KD teacher target.
    __call__(images) -> {'tokens': encode(images), 'pooled': ln_post(CLS) (B, D) (transformers'
      `pooler_output`), 'embeds': pooled @ proj (B, E) (OpenAI `encode_image`; only with a
      projection), 'patch_features': as above}.
  """
  config: Any

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    d, g = cfg.width, cfg.image_size // cfg.patch_size
    emb_init = initializers.normal(d ** -0.5)
    self.conv1 = PatchConv(cfg.patch_size, d, dtype)
    self.class_embedding = self.param('class_embedding', nn.with_logical_partitioning(
        emb_init, ('embed',)), (d,), jnp.float32)
    self.positional_embedding = self.param('positional_embedding', nn.with_logical_partitioning(
        emb_init, ('posemb', 'embed')), (g * g + 1, d), jnp.float32)
    self.ln_pre = LayerNorm(cfg.layernorm_eps, 'norm', dtype)
    self.transformer = Transformer(d, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.layernorm_eps,
                                   cfg.activation, dtype)
    self.ln_post = LayerNorm(cfg.layernorm_eps, 'norm', dtype)
    if cfg.projection_dim:
      self.proj = self.param('proj', nn.with_logical_partitioning(
          emb_init, ('embed', 'teacher')), (d, cfg.projection_dim), jnp.float32)

  def _project(self, x: jax.Array) -> jax.Array:
    if not self.config.projection_dim:
      return x.astype(jnp.float32)
    return jnp.einsum('...d,de->...e', x.astype(jnp.float32), self.proj,
                      precision=jax.lax.Precision.HIGHEST)

  def encode(self, images: jax.Array) -> jax.Array:
    """images (B, S, S, 3) -> (B, 1 + N, D) in the compute dtype."""
    cfg = self.config
    s = cfg.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
      raise ValueError(f'The CLIP tower expects images (B, {s}, {s}, 3) (config image_size='
                       f'{s}), got {tuple(images.shape)}.')
    dtype = compute_dtype(cfg.dtype)
    b = images.shape[0]
    x = self.conv1(images)
    cls = jnp.broadcast_to(self.class_embedding.astype(dtype), (b, 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding.astype(dtype)
    x = constrain(self.ln_pre(x), ACT)
    return self.transformer(x)

  def patch_features(self, images: jax.Array) -> jax.Array:
    """images (B, S, S, 3) -> (B, N, feature_size) float32: the VQ-KD teacher target."""
    return self._project(self.ln_post(self.encode(images)[:, 1:]))

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    tokens = self.encode(images)
    pooled = self.ln_post(tokens[:, 0])
    out = {'tokens': tokens, 'pooled': pooled,
           'patch_features': self._project(self.ln_post(tokens[:, 1:]))}
    if self.config.projection_dim:
      out['embeds'] = self._project(pooled)
    return out


# ----------------------------------------------------------------------------- helpers


def example_images(config, batch_size: int = 1) -> jax.Array:
  """Zero images (B, image_size, image_size, 3) float32 (for init and shapes)."""
  s = config.image_size
  return jnp.zeros((batch_size, s, s, 3), jnp.float32)


def init_clip(config, rng: jax.Array, *, boxed: bool = False) -> Any:
  """Params of a randomly initialised tower (float32; for tests and shapes)."""
  model = ClipVisionTower(config)
  params = jax.jit(lambda r: model.init(r, example_images(config))['params'])(rng)
  return params if boxed else nn.meta.unbox(params)


def abstract_params(config, *, boxed: bool = False) -> Any:
  """The params as a jax.ShapeDtypeStruct tree, without allocating."""
  model = ClipVisionTower(config)
  params = jax.eval_shape(lambda r: model.init(r, example_images(config))['params'],
                          jax.random.key(0))
  return params if boxed else nn.meta.unbox(params)


def patch_features_flops(config) -> float:
  """Forward FLOPs of `patch_features` on one image (patch conv, blocks, projection)."""
  n = (config.image_size // config.patch_size) ** 2
  d = config.width
  flops = 2 * n * config.patch_size ** 2 * 3 * d
  flops += flops_lib.encoder_forward_flops(1 + n, d, config.mlp_dim, config.layers)
  return flops + 2 * n * d * config.projection_dim
