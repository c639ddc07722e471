"""The BEiT v2 VQ-KD visual tokenizer (unilm `beit2/modeling_vqkd.py`) in Flax linen.

BEiT-3's masked image modeling predicts, for every image patch, the id of its nearest code in
the VQ-KD codebook. The tokenizer is:

    images (B, S, S, 3) in [-1, 1]
      -> encoder: BEiT-v2 ViT (pre-LN blocks; fused qkv kernel without bias plus `q_bias` and
         `v_bias` (k bias is zero); no layer scale; no relative position; learned absolute
         `pos_embed` (1, 1 + N, D) including CLS; `fc_norm` LayerNorm on each patch token)
      -> encode_task_layer: Linear(D, D) -> tanh -> Linear(D, code_dim), in float32
      -> quantize: l2-normalise, nearest code by cosine -> token ids (B, N) int32
    and, for tokenizer training only,
      codes (B, N, code_dim) -> decoder (the same ViT on the (g, g) code grid, patch 1,
      in_chans = code_dim) -> decode_task_layer: Linear -> tanh -> Linear(., decoder_out_dim).

Parameter names follow the torch state dict, so `beit3_jax.tokenizers.convert` maps them
mechanically (`blocks_3` <-> `blocks.3`, `layers_0` <-> `0`, kernel/scale/embedding <->
weight): e.g. `encoder/blocks_0/attn/qkv/kernel` <-> `encoder.blocks.0.attn.qkv.weight`,
`quantize/embedding/embedding` <-> `quantize.embedding.weight`. The quantizer's torch buffers
(`quantize.embedding.{cluster_size,embed_avg,initted}`, `quantize.cluster_size`) live in the
Flax collection 'vq_stats' (state of the EMA codebook updates), not in 'params'.

Grid matching. The released tokenizer sees 224 px images with patch 16: a 14 x 14 grid. A
model whose patch grid differs (the paper's giant: patch 14 at 224 px -> 16 x 16) gets one
token per patch by feeding the tokenizer a resized view whose grid equals the model's:
`input_size = tokenizer_view_size(model_grid, tokenizer_patch)` (16 * 16 = 256 px). The
encoder's `pos_embed`, trained on the `img_size // patch_size` grid, is then resized to the
view's grid at every call (CLS row kept) by the rule of the config's `pos_resize`:
'beit2' (default), BEiT v2's own `interpolate_pos_encoding` (torch bicubic `interpolate` with
scale_factor (g' + 0.1) / g, `beit3_jax.models.positions.resize_grid_beit2`), so that a
released tokenizer gives the codes it gives in unilm; or 'exact', the exact-size bicubic resize
of `beit3_jax.models.positions.resize_grid_bicubic` (torch `interpolate(size=...)`). The two
sample the table at slightly different points, enough to change some code ids. The parameters
keep the checkpoint's shape, so export still writes the released layout. The decoder's table is
resized the same way to the code grid.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beit3_jax.models import initializers
from beit3_jax.models.embeddings import PatchProjection
from beit3_jax.models.layers import LayerNorm, Linear, compute_dtype, constrain, l2_normalize
from beit3_jax.models.positions import resize_grid_beit2, resize_grid_bicubic

VQKDConfig = ml_collections.ConfigDict

# Every field of a tokenizer config, with its default: `vqkd_encoder_base_decoder_3x768x12_clip`.
_DEFAULTS = dict(
    img_size=224,          # images the weights were trained on: pos_embed has
                           # (img_size // patch_size)**2 + 1 rows.
    input_size=None,       # side of the view `encode` is fed (see the module docstring);
                           # None -> img_size.
    patch_size=16,
    in_chans=3,
    embed_dim=768,         # encoder ViT width D.
    depth=12,
    num_heads=12,
    mlp_dim=3072,
    layernorm_eps=1e-6,    # every LayerNorm of encoder and decoder.
    n_embed=8192,          # codebook entries (the visual vocabulary).
    code_dim=32,           # codebook vector size (torch VQKD's `embed_dim`).
    decay=0.99,            # EMA decay of the codebook updates (tokenizer training).
    decoder_embed_dim=768,
    decoder_depth=3,       # 1 or 3 in the released tokenizers.
    decoder_num_heads=12,
    decoder_mlp_dim=3072,
    decoder_out_dim=512,   # teacher feature size: CLIP ViT-B/16 512, DINO ViT-B/16 768.
    dtype='float32',       # compute dtype of the ViTs; task layers and lookup run in float32.
    pos_resize='beit2',    # how pos_embed meets another grid (input_size != img_size):
                           # 'beit2' as BEiT v2's code, 'exact' an exact-size bicubic resize
                           # (see `resize_pos_embed`).
)

VARIANTS: dict[str, dict] = {
    'base': {},
    # ViT-L/16 encoder (BEiT-3 used a ViT-L VQ-KD, unilm#1157; never released). The decoder
    # size of that tokenizer is unknown; it stays the released 768-wide one.
    'large': dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    # The released checkpoints (beit2/TOKENIZER.md), by their timm model names.
    'vqkd_encoder_base_decoder_3x768x12_clip': dict(decoder_depth=3),
    'vqkd_encoder_base_decoder_1x768x12_clip': dict(decoder_depth=1),
    'vqkd_encoder_base_decoder_1x768x12_dino': dict(decoder_depth=1, decoder_out_dim=768),
}

DTYPES = ('float32', 'bfloat16')
POS_RESIZE_MODES = ('beit2', 'exact')  # see `resize_pos_embed`.
ACT = ('batch', 'length', 'embed')  # logical names of the residual stream (B, S, D).
_INIT_STD = 0.02  # timm trunc_normal_(std=.02): bounds +-2 (absolute) never cut at this std.


def get_vqkd_config(variant: str = 'base', **overrides) -> ml_collections.ConfigDict:
  """The locked tokenizer config of a named variant, with `overrides` applied.

  Args:
    variant: one of `VARIANTS`: 'base' (= the recommended
      `vqkd_encoder_base_decoder_3x768x12_clip`), 'large' (ViT-L encoder) or a released name.
    **overrides: any config field, e.g. `decoder_depth=1, input_size=256`.

  Raises:
    KeyError: unknown variant or unknown field (the message names it).
    ValueError: inconsistent values (the message names the field).
  """
  if variant not in VARIANTS:
    raise KeyError(f'Unknown VQ-KD variant {variant!r}; known: {sorted(VARIANTS)}.')
  fields = dict(_DEFAULTS)
  fields.update(VARIANTS[variant])
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f'Unknown VQ-KD config field(s) {unknown}; known fields: {sorted(fields)}.')
  fields.update(overrides)
  if fields['input_size'] is None:
    fields['input_size'] = fields['img_size']
  config = ml_collections.ConfigDict(fields)
  config.variant = variant
  validate_vqkd_config(config)
  config.lock()
  return config


def validate_vqkd_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field of a tokenizer config."""
  for width, heads in (('embed_dim', 'num_heads'), ('decoder_embed_dim', 'decoder_num_heads')):
    if config[width] % config[heads]:
      raise ValueError(f'{width}={config[width]} is not divisible by {heads}={config[heads]}.')
  for size in ('img_size', 'input_size'):
    if config[size] <= 0 or config[size] % config.patch_size:
      raise ValueError(f'{size}={config[size]} is not a positive multiple of '
                       f'patch_size={config.patch_size}.')
  for field in ('depth', 'decoder_depth', 'n_embed', 'code_dim', 'decoder_out_dim'):
    if config[field] < 1:
      raise ValueError(f'{field}={config[field]} must be >= 1.')
  if config.dtype not in DTYPES:
    raise ValueError(f'dtype={config.dtype!r}; expected one of {DTYPES}.')
  if config.pos_resize not in POS_RESIZE_MODES:
    raise ValueError(f'pos_resize={config.pos_resize!r}; expected one of {POS_RESIZE_MODES}.')


def token_grid(config) -> tuple[int, int]:
  """(rows, cols) of the tokens `encode` returns: the input view's patch grid."""
  g = config.input_size // config.patch_size
  return g, g


def tokenizer_view_size(model_grid, tokenizer_patch: int = 16):
  """Side in pixels of the tokenizer view whose patch grid equals the model's.

  The grid-matching rule: one visual token per model patch, so the tokenizer is fed the same
  crop resized to `model_grid * tokenizer_patch` pixels (bicubic, like BEiT v2's second view).
  E.g. the giant (patch 14 at 224 px: a 16 x 16 grid) with the patch-16 tokenizer: 256 px.
  Use it as the tokenizer config's `input_size`.

  Args:
    model_grid: the model's patches per side (an int), or (rows, cols).
    tokenizer_patch: the tokenizer's patch size (config.patch_size).

  Returns:
    An int for an int grid, else (height, width) in pixels.
  """
  scalar = np.ndim(model_grid) == 0
  grid = (model_grid,) if scalar else tuple(model_grid)
  if not grid or any(int(g) != g or g < 1 for g in (*grid, tokenizer_patch)):
    raise ValueError(f'model_grid={model_grid!r} and tokenizer_patch={tokenizer_patch!r} must '
                     'be positive integers.')
  sizes = tuple(int(g) * int(tokenizer_patch) for g in grid)
  return sizes[0] if scalar else sizes


def to_tokenizer_range(images: jax.Array) -> jax.Array:
  """Images in [0, 1] -> [-1, 1], the tokenizer's input range (beit2 `pre_process`)."""
  return images * 2.0 - 1.0


# ----------------------------------------------------------------------------- positions


@functools.lru_cache(maxsize=16)
def _bicubic_resize_matrix(grid: int, new_hw: tuple[int, int], mode: str) -> np.ndarray:
  """(new_h * new_w, grid**2) float32 matrix M with M @ rows = the `mode` resize of rows."""
  resize = resize_grid_beit2 if mode == 'beit2' else resize_grid_bicubic
  basis = np.eye(grid * grid, dtype=np.float64).reshape(grid, grid, grid * grid)
  return resize(basis, new_hw).reshape(new_hw[0] * new_hw[1], -1).astype(np.float32)


def resize_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int],
                     mode: str = 'beit2') -> jax.Array:
  """A (1, 1 + g*g, D) position table resized to a (h, w) patch grid: (1, 1 + h*w, D).

  The CLS row is kept; the patch rows, a row-major (g, g, D) grid, are resized bicubically
  (torch, A = -0.75, align_corners=False), written as one constant matrix so that it runs under
  jit (equal to the NumPy rule up to float32 rounding). The same grid returns the table
  unchanged in either mode (BEiT v2 too adds its table as is there).

  Args:
    pos_embed: (1, 1 + g*g, D) table, floating dtype.
    grid_hw: (h, w), the patch grid of the input in cells.
    mode: 'beit2', BEiT v2's `interpolate_pos_encoding`: torch `interpolate` with
      scale_factor (h + 0.1) / g, (w + 0.1) / g, i.e. output cell i samples source coordinate
      (i + 0.5) * g / (h + 0.1) - 0.5 (`positions.resize_grid_beit2`); or 'exact', torch
      `interpolate(size=(h, w))`, coordinate (i + 0.5) * g / h - 0.5
      (`positions.resize_grid_bicubic`).

  Returns:
    (1, 1 + h*w, D) in `pos_embed`'s dtype.
  """
  if mode not in POS_RESIZE_MODES:
    raise ValueError(f'mode={mode!r}; expected one of {POS_RESIZE_MODES}.')
  n = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else -1
  g = math.isqrt(max(n, 0))
  if n < 1 or pos_embed.shape[0] != 1 or g * g != n:
    raise ValueError(f'Expected a (1, 1 + g*g, D) position table, got {pos_embed.shape}.')
  h, w = (int(s) for s in grid_hw)
  if min(h, w) < 1:
    raise ValueError(f'Cannot resize a position table to a {h}x{w} grid.')
  if (h, w) == (g, g):
    return pos_embed
  matrix = jnp.asarray(_bicubic_resize_matrix(g, (h, w), mode))
  patches = jnp.einsum('nm,md->nd', matrix, pos_embed[0, 1:].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:, :1], patches[None].astype(pos_embed.dtype)], axis=1)


# ----------------------------------------------------------------------------- codebook


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Ids of the codes nearest to z by cosine: argmax_k <z/|z|, e_k/|e_k|>.

  torch's NormEMAVectorQuantizer takes argmin_k |z/|z| - e_k|^2 with unit-norm codes, the same
  code. Computed in float32 at full matmul precision.

  Args:
    z: (..., code_dim) features (normalised here).
    codebook: (n_embed, code_dim) codes (normalised here).

  Returns:
    (...) int32 ids in [0, n_embed).
  """
  sim = jnp.einsum('...c,kc->...k', l2_normalize(z.astype(jnp.float32)),
                   l2_normalize(codebook.astype(jnp.float32)),
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32)


def _unit_rows(key, shape, dtype=jnp.float32):
  """Gaussian rows, l2-normalised (torch EmbeddingEMA's init without k-means)."""
  return l2_normalize(jax.random.normal(key, shape, dtype))


class Codebook(nn.Module):
  """torch `EmbeddingEMA`: the codes `embedding` (n_embed, code_dim) and their EMA statistics.

  'vq_stats' (created at init; read and written only by tokenizer training):
  `cluster_size` (n_embed,) zeros, `embed_avg` (n_embed, code_dim) = the initial codes,
  `initted` (1,) = 1.0 (the codes are initialised; a trainer sets it to 0 for k-means init).
  """
  n_embed: int
  code_dim: int

  @nn.compact
  def __call__(self) -> jax.Array:
    """Returns the codes (n_embed, code_dim) float32 (unit rows when trained as in beit2)."""
    n, c = self.n_embed, self.code_dim
    table = self.param('embedding', nn.with_logical_partitioning(_unit_rows, ('codebook', 'code')),
                       (n, c), jnp.float32)
    if self.is_initializing():
      def stat(name, value, axes):
        self.variable('vq_stats', name, nn.with_logical_partitioning(lambda: value, axes))
      stat('cluster_size', jnp.zeros((n,), jnp.float32), ('codebook',))
      stat('embed_avg', table, ('codebook', 'code'))
      stat('initted', jnp.ones((1,), jnp.float32), (None,))
    return table


class VectorQuantizer(nn.Module):
  """torch `NormEMAVectorQuantizer`: codebook `embedding` and the usage count buffer.

  'vq_stats': `cluster_size` (n_embed,) zeros (EMA of per-code counts; created at init).
  """
  n_embed: int
  code_dim: int

  def setup(self):
    self.embedding = Codebook(self.n_embed, self.code_dim)
    if self.is_initializing():
      self.variable('vq_stats', 'cluster_size', nn.with_logical_partitioning(
          lambda: jnp.zeros((self.n_embed,), jnp.float32), ('codebook',)))

  def __call__(self, z: jax.Array) -> jax.Array:
    """z (B, N, code_dim) -> ids (B, N) int32 of the nearest codes by cosine."""
    ids = nearest_code(z, self.embedding())
    return constrain(ids, ('batch', 'length'))

  def lookup(self, ids: jax.Array) -> jax.Array:
    """ids (B, N) int -> codes (B, N, code_dim) float32, rows of `embedding` as stored."""
    return jnp.take(self.embedding(), ids, axis=0)


# ----------------------------------------------------------------------------- ViT


class QKV(nn.Module):
  """The fused q/k/v projection without bias: (B, S, D) -> 3 x (B, S, H, d).

  Parameter `kernel` (D, 3, H, d), N(0, 0.02); torch's `qkv.weight` (3 H d, D) transposed.
  """
  embed_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, h = self.embed_dim, self.num_heads
    kernel = self.param('kernel', nn.with_logical_partitioning(
        initializers.normal(_INIT_STD), ('embed', None, 'heads', 'kv')),
        (d, 3, h, d // h), jnp.float32)
    qkv = jnp.einsum('bsd,dthe->tbshe', x.astype(self.dtype), kernel.astype(self.dtype))
    return qkv[0], qkv[1], qkv[2]


class Attention(nn.Module):
  """BEiT-v2 attention: q = x Wq + q_bias, k = x Wk, v = x Wv + v_bias; then `proj`.

  Parameters: `qkv/kernel` (D, 3, H, d), `q_bias` and `v_bias` (H, d) init 0, `proj/kernel`
  (H, d, D) N(0, 0.02 / sqrt(2 (layer + 1))) (beit2 `fix_init_weight`), `proj/bias` (D,) 0.
  Softmax in float32. (B, S, D) -> (B, S, D).
  """
  embed_dim: int
  num_heads: int
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, h = self.embed_dim, self.num_heads
    hd = d // h
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ('heads', 'kv'))
    q_bias = self.param('q_bias', zeros, (h, hd), jnp.float32)
    v_bias = self.param('v_bias', zeros, (h, hd), jnp.float32)
    q, k, v = QKV(d, h, self.dtype, name='qkv')(x)
    q = (q + q_bias.astype(self.dtype)) * jnp.asarray(hd ** -0.5, self.dtype)
    v = v + v_bias.astype(self.dtype)
    q = constrain(q, ('batch', 'length', 'heads', 'kv'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    proj_init = initializers.normal(_INIT_STD / math.sqrt(2.0 * (self.layer + 1)))
    return Linear((h, hd), (d,), ('heads', 'kv', 'embed'), proj_init, nn.initializers.zeros,
                  self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU (float32) -> fc2. fc2's init is scaled like `proj` (fix_init_weight)."""
  embed_dim: int
  mlp_dim: int
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, f = self.embed_dim, self.mlp_dim
    zeros = nn.initializers.zeros
    fc2_init = initializers.normal(_INIT_STD / math.sqrt(2.0 * (self.layer + 1)))
    h = Linear((d,), (f,), ('embed', 'mlp'), initializers.normal(_INIT_STD), zeros, self.dtype,
               name='fc1')(x)
    h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(self.dtype)
    h = constrain(h, ('batch', 'length', 'mlp'))
    return Linear((f,), (d,), ('mlp', 'embed'), fc2_init, zeros, self.dtype, name='fc2')(h)


class Block(nn.Module):
  """Pre-LN block: x + attn(norm1(x)), then + mlp(norm2(x)). No layer scale, no drop path."""
  embed_dim: int
  num_heads: int
  mlp_dim: int
  eps: float
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ln = functools.partial(LayerNorm, self.eps, 'norm', self.dtype)
    x = x + Attention(self.embed_dim, self.num_heads, self.layer, self.dtype, name='attn')(
        ln(name='norm1')(x))
    x = x + Mlp(self.embed_dim, self.mlp_dim, self.layer, self.dtype, name='mlp')(
        ln(name='norm2')(x))
    return constrain(x, ACT)


class PatchEmbed(nn.Module):
  """torch `patch_embed`: its Conv2d(C, D, P, stride P) `proj`, as a matmul over patches."""
  patch_size: int
  in_chans: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    return PatchProjection(self.patch_size, self.in_chans, self.embed_dim, self.dtype,
                           name='proj')(images)


class VisionTransformer(nn.Module):
  """beit2's `VisionTransformer` as VQ-KD uses it: (B, H, W, C) -> fc_norm(patch tokens).

  Parameters: `patch_embed/proj/{kernel,bias}`, `cls_token` (1, 1, D) and `pos_embed`
  (1, 1 + g*g, D) with g = img_size // patch_size (both N(0, 0.02)), `blocks_{i}`, `fc_norm`.
  Inputs whose patch grid is not g x g get the table resized (`resize_pos_embed` by the rule
  `pos_resize`, 'beit2' or 'exact').

  Returns (B, N, D) in `dtype`, N = (H / P) (W / P) patches in row-major order, the
  `fc_norm` LayerNorm applied to every patch token (no pooling; the CLS output is dropped).
  """
  img_size: int
  patch_size: int
  in_chans: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  eps: float
  dtype: Any = jnp.float32
  pos_resize: str = 'beit2'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, d = self.patch_size, self.embed_dim
    if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'{self.name}: expected (B, H, W, {self.in_chans}) with H, W multiples '
                       f'of {p}, got {images.shape}.')
    if images.shape[3] != self.in_chans:
      raise ValueError(f'{self.name}: expected {self.in_chans} channels, got {images.shape}.')
    grid = (images.shape[1] // p, images.shape[2] // p)
    x = PatchEmbed(p, self.in_chans, d, self.dtype, name='patch_embed')(images)
    g = self.img_size // p
    init = initializers.normal(_INIT_STD)
    cls_token = self.param('cls_token', nn.with_logical_partitioning(
        init, (None, None, 'embed')), (1, 1, d), jnp.float32)
    pos_embed = self.param('pos_embed', nn.with_logical_partitioning(
        init, (None, 'posemb', 'embed')), (1, g * g + 1, d), jnp.float32)
    cls = jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, d))
    pos = resize_pos_embed(pos_embed, grid, self.pos_resize).astype(self.dtype)
    x = jnp.concatenate([cls, x], axis=1) + pos
    x = constrain(x, ACT)
    for i in range(self.depth):
      x = Block(d, self.num_heads, self.mlp_dim, self.eps, i, self.dtype, name=f'blocks_{i}')(x)
    return LayerNorm(self.eps, 'norm', self.dtype, name='fc_norm')(x[:, 1:])


class TaskLayer(nn.Module):
  """torch `nn.Sequential(Linear(D, D), Tanh(), Linear(D, out))`: `layers_0`, `layers_2`.

  Weights N(0, 0.02), biases 0. (..., D) -> (..., out) in `dtype`.
  """
  embed_dim: int
  out_dim: int
  out_axis: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.embed_dim
    init, zeros = initializers.normal(_INIT_STD), nn.initializers.zeros
    h = Linear((d,), (d,), ('embed', 'mlp'), init, zeros, self.dtype, name='layers_0')(x)
    h = jnp.tanh(h)
    return Linear((d,), (self.out_dim,), ('mlp', self.out_axis), init, zeros, self.dtype,
                  name='layers_2')(h)


# ----------------------------------------------------------------------------- VQ-KD


class VQKD(nn.Module):
  """The VQ-KD tokenizer. Call its methods with `model.apply(variables, x, method=...)`.

  Only 'params' is needed by `encode`, `encoder_features`, `code_features`, `lookup` and
  `decode`; `init` also creates the 'vq_stats' collection (see `Codebook`).

  Methods:
    encode(images) -> token ids (B, N) int32: the pretraining targets.
    encoder_features(images) -> (B, N, D): per-patch `fc_norm` features of the encoder.
    code_features(images) -> (B, N, code_dim) float32: encode_task_layer output (before
      the l2 normalisation of the lookup).
    lookup(ids) -> (B, N, code_dim) float32: the codes of ids.
    decode(codes) -> (B, N, decoder_out_dim) float32: reconstruction of teacher features.
    __call__(images) -> dict of ids, z (unit-norm features), z_q (codes with a
      straight-through gradient to z) and rec = decode(z_q): the tokenizer-training pass.

  `images` are (B, input_size, input_size, in_chans) float NHWC in the tokenizer's range
  [-1, 1] (`to_tokenizer_range`); N = (input_size // patch_size)**2.
  """
  config: Any

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg.dtype)
    eps = cfg.layernorm_eps
    pos_resize = cfg.pos_resize
    self.encoder = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                     cfg.depth, cfg.num_heads, cfg.mlp_dim, eps, dtype,
                                     pos_resize)
    self.decoder = VisionTransformer(cfg.img_size // cfg.patch_size, 1, cfg.code_dim,
                                     cfg.decoder_embed_dim, cfg.decoder_depth,
                                     cfg.decoder_num_heads, cfg.decoder_mlp_dim, eps, dtype,
                                     pos_resize)
    self.encode_task_layer = TaskLayer(cfg.embed_dim, cfg.code_dim, 'code', jnp.float32)
    self.decode_task_layer = TaskLayer(cfg.decoder_embed_dim, cfg.decoder_out_dim, 'teacher',
                                       dtype)
    self.quantize = VectorQuantizer(cfg.n_embed, cfg.code_dim)

  def encoder_features(self, images: jax.Array) -> jax.Array:
    """images (B, S, S, C) in [-1, 1], S = input_size -> (B, N, D) in the compute dtype."""
    cfg = self.config
    want = (cfg.input_size, cfg.input_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f'VQ-KD expects images (B, {want[0]}, {want[1]}, {want[2]}) (config '
                       f'input_size={cfg.input_size}), got {tuple(images.shape)}.')
    return self.encoder(images)

  def code_features(self, images: jax.Array) -> jax.Array:
    """images -> (B, N, code_dim) float32, encode_task_layer at full float32 precision."""
    features = self.encoder_features(images).astype(jnp.float32)
    with jax.default_matmul_precision('highest'):
      return self.encode_task_layer(features)

  def encode(self, images: jax.Array) -> jax.Array:
    """images -> token ids (B, N) int32: the nearest code (by cosine) of every patch."""
    return self.quantize(self.code_features(images))

  def lookup(self, ids: jax.Array) -> jax.Array:
    """ids (B, N) -> codes (B, N, code_dim) float32."""
    return self.quantize.lookup(ids)

  def decode(self, codes: jax.Array) -> jax.Array:
    """codes (B, N, code_dim), N a square, -> (B, N, decoder_out_dim) float32."""
    b, n, c = codes.shape
    g = math.isqrt(n)
    if g * g != n or c != self.config.code_dim:
      raise ValueError(f'decode expects (B, N, {self.config.code_dim}) with N a square, '
                       f'got {codes.shape}.')
    features = self.decoder(codes.reshape(b, g, g, c))
    return self.decode_task_layer(features).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    z = self.code_features(images)
    ids = self.quantize(z)
    z = l2_normalize(z)
    z_q = z + jax.lax.stop_gradient(self.lookup(ids) - z)
    return dict(ids=ids, z=z, z_q=z_q, rec=self.decode(z_q))


def example_images(config, batch_size: int = 1) -> jax.Array:
  """Zero images (B, input_size, input_size, in_chans) float32 (for init and shapes)."""
  s = config.input_size
  return jnp.zeros((batch_size, s, s, config.in_chans), jnp.float32)


def init_vqkd(config, rng: jax.Array, *, boxed: bool = False) -> tuple[Any, Any]:
  """(params, vq_stats) of a freshly initialised tokenizer (float32, default device).

  For variables born sharded use `beit3_jax.sharding.init_sharded` with
  `lambda r: VQKD(config).init(r, example_images(config))`.
  """
  model = VQKD(config)
  variables = jax.jit(lambda r: model.init(r, example_images(config)))(rng)
  if not boxed:
    variables = nn.meta.unbox(variables)
  return variables['params'], variables['vq_stats']


def abstract_variables(config, *, boxed: bool = False) -> tuple[Any, Any]:
  """(params, vq_stats) as jax.ShapeDtypeStruct trees, without allocating."""
  model = VQKD(config)
  variables = jax.eval_shape(lambda r: model.init(r, example_images(config)), jax.random.key(0))
  if not boxed:
    variables = nn.meta.unbox(variables)
  return variables['params'], variables['vq_stats']
