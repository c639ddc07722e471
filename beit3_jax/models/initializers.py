"""Initialisation schemes of the backbone's parameters.

Three schemes, chosen by `config.init`:

- `'unilm'` (default): what a freshly built unilm `BEiT3Wrapper` holds. Every Linear weight is
  a normal of std 0.02 truncated at +-1 std (so |w| <= 0.02 and the sample std is
  0.02 * 0.5396), every Linear bias 0. LayerNorms 1/0.
- `'torchscale'`: torchscale's own init: torch's Linear default, U(+-1/sqrt(fan_in)) for weight
  and bias, then the Magneto gain gamma = sqrt(log(2 * depth)) on the weights and biases of
  `fc1`, `fc2`, `out_proj` and `v_proj` (q/k projections and norms untouched).
- `'beit'`: the paper's BEiT init: the unilm truncated normal, then the weights of layer l's
  (1-based) attention `out_proj` and FFN `fc2` divided by sqrt(2 l).

In every scheme the embeddings keep torchscale's init: the text table N(0, D**-0.5), the
position tables N(0, 1) (std `config.position_init_std`, default 1), the patch convolution
U(+-1/sqrt(C P P)) for weight and bias, the CLS and mask tokens 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Sample std of a standard normal truncated to [-1, 1].
TRUNCATED_NORMAL_1SD_STD = 0.5395685
UNILM_STD = 0.02


def magneto_gain(depth: int) -> float:
  """Sub-LN (Magneto) gain of an encoder-only model: sqrt(log(2 * depth))."""
  return math.sqrt(math.log(2 * depth))


def truncated_normal_1sd(std: float, scale: float = 1.0):
  """N(0, std) truncated at +-std, times `scale` (unilm's `trunc_normal_`)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype) * (std * scale)
  return init


def uniform_fan_in(fan_in: int, scale: float = 1.0):
  """U(+-scale/sqrt(fan_in)): torch's default for Linear/Conv weights and biases."""
  bound = scale / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def normal(std: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * std
  return init


def linear_inits(scheme: str, fan_in: int, *, role: str, layer: int, depth: int):
  """(kernel_init, bias_init) of one Linear of the encoder.

  Args:
    scheme: 'unilm', 'torchscale' or 'beit'.
    fan_in: input features of the Linear.
    role: its torchscale name: 'q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1' or 'fc2'.
    layer: 0-based layer index (an int, or a traced int array inside scanned layers).
    depth: number of layers.
  """
  if scheme == 'torchscale':
    gain = magneto_gain(depth) if role in ('fc1', 'fc2', 'out_proj', 'v_proj') else 1.0
    return uniform_fan_in(fan_in, gain), uniform_fan_in(fan_in, gain)
  scale = 1.0
  if scheme == 'beit' and role in ('out_proj', 'fc2'):
    if isinstance(layer, int):
      scale = 1.0 / math.sqrt(2.0 * (layer + 1))
    else:
      scale = jax.lax.rsqrt(2.0 * (jnp.asarray(layer, jnp.float32) + 1.0))
  elif scheme not in ('unilm', 'beit'):
    raise ValueError(f'Unknown init scheme {scheme!r}.')
  return truncated_normal_1sd(UNILM_STD, scale), jax.nn.initializers.zeros
