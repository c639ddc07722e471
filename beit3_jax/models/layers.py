"""Building blocks: a logically partitioned Linear, a float32 LayerNorm, Multiway routing.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical axis
names (see `beit3_jax.sharding.LOGICAL_RULES` for the full list and their mesh axes).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from beit3_jax import sharding

Initializer = Callable[..., jax.Array]


def compute_dtype(name: str):
  """The jnp dtype of a config's `dtype` field."""
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names (no-op without a mesh); a mesh
  axis that does not divide its dimension is left out (`sharding.constrain`)."""
  return sharding.constrain(x, names)


class Linear(nn.Module):
  """y = x . kernel + bias, contracting the last `len(in_features)` axes of x.

  A Linear with `in_features=(H, d)` and `features=(D,)` maps (..., H, d) -> (..., D);
  `in_features=(D,)`, `features=(H, d)` maps (..., D) -> (..., H, d). The kernel has shape
  in_features + features and logical names `kernel_axes`; the bias has shape `features` and the
  trailing names. Inputs and kernel are cast to `dtype`; the kernel is stored in float32.
  """
  in_features: tuple[int, ...]
  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  kernel_init: Initializer
  bias_init: Initializer
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_features)
    if x.shape[-n_in:] != tuple(self.in_features):
      raise ValueError(f'{self.name}: input trailing shape {x.shape[-n_in:]} != '
                       f'{tuple(self.in_features)}.')
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        tuple(self.in_features) + tuple(self.features), jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if not self.use_bias:
      return y
    bias = self.param(
        'bias', nn.with_logical_partitioning(self.bias_init, self.kernel_axes[n_in:]),
        tuple(self.features), jnp.float32)
    return y + bias.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32, returned in `dtype`.

  Parameters `scale` (1) and `bias` (0), with the logical axis name `axis_name`.
  """
  eps: float
  axis_name: str = 'norm'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (n,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (n,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


# Static routing modes of a Multiway sublayer.
VISION_ONLY = -1  # split position of an image-only sequence: every token uses expert A.
TEXT_ONLY = 0     # split position of a text-only sequence: every token uses expert B.


class Multiway(nn.Module):
  """Modality experts of one sublayer: A (vision), B (language), optionally C (vision-language).

  Routing is a pure function of the static `split_position` (torchscale's
  `multiway_split_position`): -1 -> A on every token; 0 -> B on every token; p > 0 -> A on
  tokens [0, p) and B on [p, S) of the sequence axis (axis 1), concatenated. With
  `use_vl_expert=True` and p > 0, every token goes through C instead (the paper's VL-FFN in the
  top layers).

  Attributes:
    make_expert: builds one expert module given `name=` ('A', 'B' or 'C'), e.g. a partial of
      `Linear`. Each expert maps (B, S, ...) -> (B, S, ...).
    use_vl_expert: this sublayer owns the vision-language expert C.
  """
  make_expert: Callable[..., nn.Module]
  use_vl_expert: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, split_position: int) -> jax.Array:
    names = ('A', 'B', 'C') if self.use_vl_expert else ('A', 'B')
    experts = {name: self.make_expert(name=name) for name in names}
    if self.is_initializing():
      # Routing only calls some experts; create the parameters of all of them.
      for expert in experts.values():
        expert(x)
    if split_position == VISION_ONLY:
      return experts['A'](x)
    if split_position == TEXT_ONLY:
      return experts['B'](x)
    if self.use_vl_expert:
      return experts['C'](x)
    p = split_position
    return jnp.concatenate([experts['A'](x[:, :p]), experts['B'](x[:, p:])], axis=1)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis (torch `F.normalize`)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)
