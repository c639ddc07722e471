"""Token embeddings of BEiT-3: text ids, image patches, and the two Multiway position tables."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit3_jax.models import initializers

# fairseq convention kept by torchscale: position ids start at 2 in both tables.
POSITION_OFFSET = 2


class TextEmbedding(nn.Module):
  """Text ids (B, L) int32 -> (B, L, D). Table `embedding` (vocab_size, D), init N(0, D**-0.5).

  No padding row: the pad id (1) has an ordinary learned row (torchscale has no padding_idx).
  """
  vocab_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    table = self.param('embedding', nn.with_logical_partitioning(
        initializers.normal(self.embed_dim ** -0.5), ('vocab', 'embed')),
        (self.vocab_size, self.embed_dim), jnp.float32)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


class PatchProjection(nn.Module):
  """Images (B, H, W, C) -> patch features (B, N_p, D), patches in row-major order.

  torchscale's Conv2d(C, D, kernel=stride=P) written as one matmul over flattened patches.
  Parameters `kernel` (P, P, C, D) and `bias` (D,), both U(+-1/sqrt(C P P)) like torch's conv.
  """
  patch_size: int
  in_chans: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, c, d = self.patch_size, self.in_chans, self.embed_dim
    fan_in = c * p * p
    kernel = self.param('kernel', nn.with_logical_partitioning(
        initializers.uniform_fan_in(fan_in), ('patch_h', 'patch_w', 'channels', 'embed')),
        (p, p, c, d), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(
        initializers.uniform_fan_in(fan_in), ('embed',)), (d,), jnp.float32)
    b, h, w, _ = images.shape
    gh, gw = h // p, w // p
    patches = images.astype(self.dtype).reshape(b, gh, p, gw, p, c)
    x = jnp.einsum('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype))
    x = x.reshape(b, gh * gw, d) + bias.astype(self.dtype)
    return x


class VisionEmbedding(nn.Module):
  """torchscale's `vision_embed`: patch projection `proj`, then mask tokens, then CLS first.

  Parameters `proj/{kernel,bias}`, `cls_token` and `mask_token` (1, 1, D), the tokens init 0.
  """
  patch_size: int
  in_chans: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
    """images (B, H, W, C) float, image_mask (B, N_p) bool -> (B, 1 + N_p, D)."""
    d = self.embed_dim
    x = PatchProjection(self.patch_size, self.in_chans, d, self.dtype, name='proj')(images)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, (None, None, 'embed'))
    cls_token = self.param('cls_token', zeros, (1, 1, d), jnp.float32)
    mask_token = self.param('mask_token', zeros, (1, 1, d), jnp.float32)
    if image_mask is not None:
      m = image_mask.astype(self.dtype)[..., None]
      x = x * (1 - m) + mask_token.astype(self.dtype) * m
    cls = jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, d))
    return jnp.concatenate([cls, x], axis=1)


class PositionTable(nn.Module):
  """Learned positions `embedding` (num_rows, D), init N(0, init_std**2) (torchscale: std 1);
  looks up rows 2 .. 2 + length."""
  num_rows: int
  embed_dim: int
  dtype: Any = jnp.float32
  init_std: float = 1.0

  @nn.compact
  def __call__(self, length: int, positions: jax.Array | None = None) -> jax.Array:
    """Returns (1, length, D) = rows [2, 2 + length) of the table.

    With `positions` (B, length) int (0-based indices), returns (B, length, D) = rows
    positions + 2 instead (explicit positions for incremental decoding; not range checked when
    traced, out-of-range indices are clamped by the gather).
    """
    table = self.param('embedding', nn.with_logical_partitioning(
        initializers.normal(self.init_std), ('posemb', 'embed')), (self.num_rows, self.embed_dim),
        jnp.float32)
    if positions is not None:
      rows = jnp.asarray(positions).astype(jnp.int32) + POSITION_OFFSET
      return jnp.take(table, rows, axis=0, mode='clip').astype(self.dtype)
    if POSITION_OFFSET + length > self.num_rows:
      raise ValueError(f'{self.name}: {length} positions need {POSITION_OFFSET + length} rows, '
                       f'the table has {self.num_rows}.')
    return table[None, POSITION_OFFSET:POSITION_OFFSET + length].astype(self.dtype)


class MultiwayPositions(nn.Module):
  """torchscale's `encoder.embed_positions`: table A (vision, N_p + 3 rows), B (text).

  Each modality's span restarts at row 2 of its own table: for split position p > 0, tokens
  [0, p) get A's rows 2 .. p + 1 and tokens [p, S) get B's rows 2 .. S - p + 1.
  """
  num_vision_rows: int
  num_text_rows: int
  embed_dim: int
  dtype: Any = jnp.float32
  init_std: float = 1.0     # of both tables (config.position_init_std)

  @nn.compact
  def __call__(self, seq_len: int, split_position: int,
               text_positions: jax.Array | None = None) -> jax.Array:
    """Returns (1, seq_len, D) position embeddings for a sequence routed by split_position.

    `text_positions` (B, L) int, L = the number of text tokens, gives the text tokens explicit
    0-based positions (table B rows text_positions + 2; torchscale's `positions` minus 2);
    the result is then (B, seq_len, D). The vision span always uses rows 2 .. p + 1.
    """
    vision = PositionTable(self.num_vision_rows, self.embed_dim, self.dtype, self.init_std,
                           name='A')
    text = PositionTable(self.num_text_rows, self.embed_dim, self.dtype, self.init_std, name='B')
    if self.is_initializing():  # a one-modality init still creates both tables
      vision(1), text(1)
    if split_position == -1:
      if text_positions is not None:
        raise ValueError('text_positions given for a sequence without text.')
      return vision(seq_len)
    if split_position == 0:
      return text(seq_len, text_positions)
    text_pos = text(seq_len - split_position, text_positions)
    vision_pos = vision(split_position)
    if text_positions is not None:
      vision_pos = jnp.broadcast_to(vision_pos, (text_pos.shape[0],) + vision_pos.shape[1:])
    return jnp.concatenate([vision_pos, text_pos], axis=1)
