"""How a Flax parameter is laid out as a PyTorch tensor, and the errors of a conversion.

A model's mapping table (`beit3_jax.convert` for BEiT-3, `beit3_jax.tokenizers.convert` for
VQ-KD) gives each Flax path a layout kind with a list of (regex, kind) rules; the functions
here move an array between the two layouts:

| kind         | Flax shape            | torch shape        |
|--------------|-----------------------|--------------------|
| `linear_in1` | (in, *out)            | (prod(out), in)    |
| `linear_in2` | (in1, in2, *out)      | (prod(out), in1*in2) |
| `conv`       | (P, P, C, D)          | (D, C, P, P)       |
| `flat`       | any                   | flattened          |
| `same`       | any                   | the same           |
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from beit3_jax import param_tree


class ConversionError(param_tree.TreeMismatch):
  """A state dict that does not fit the model: lists every bad key."""


@dataclasses.dataclass
class Report:
  """What a conversion did: the number of tensors converted and the keys deliberately skipped."""
  converted: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)


def layout_kind(flax_path: str, rules: Sequence[tuple[str, str]]) -> str:
  """The layout kind of a Flax path: the first rule (regex, kind) of `rules` that matches it."""
  for pattern, kind in rules:
    if re.search(pattern, flax_path):
      return kind
  raise AssertionError(flax_path)


def torch_layout_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind in ('linear_in1', 'linear_in2'):
    n_in = 1 if kind == 'linear_in1' else 2
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
  if kind == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == 'flat':
    return (math.prod(shape),)
  return tuple(shape)


def to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind in ('linear_in1', 'linear_in2'):
    n_in = 1 if kind == 'linear_in1' else 2
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)
  if kind == 'conv':
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if kind == 'flat':
    return x.reshape(-1)
  return x


def to_flax_layout(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if kind in ('linear_in1', 'linear_in2'):
    return np.ascontiguousarray(w.T).reshape(shape)
  if kind == 'conv':
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  return w.reshape(shape)


def mismatch_error(what: str, missing, unexpected, misshaped, config_description: str,
                   checkpoint_description: str | None = None) -> ConversionError:
  """One ConversionError listing every missing, unexpected and mis-shaped key
  (`param_tree.describe`'s report)."""
  notes = ([f'the checkpoint looks like: {checkpoint_description}']
           if checkpoint_description is not None else [])
  d = param_tree.Diff(tuple(missing), tuple(unexpected), tuple(misshaped))
  return ConversionError(param_tree.describe(d, what, f'the model config ({config_description})',
                                             notes))
