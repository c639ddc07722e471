"""The batch schema: the keys, shapes and dtypes of every batch the trainers consume.

One global batch of pretraining is a dict of three streams, each with its own batch size:

    {'image': {...}, 'text': {...}, 'pair': {...}}

and a fine-tuning batch is one task's dict, laid out by the task's `batch_fields`
(`beit3_jax.tasks`), built from the fields here. Images travel as uint8 (B, H, W, 3) and are
normalised on device (4x less host memory and transfer than float32). The flip and colour
jitter of the image streams travel as their drawn parameters and are applied on the device, where the visual
tokenizer's view is derived from the jittered image (`data.device_augment.finish_images`). The
host reference layout (`PretrainInputs(views_on_device=False)`) has `tokenizer_image` (B, T, T,
3) uint8, the flipped and jittered lanczos view, instead of `flip`, `jitter` and
`jitter_order`, and a flipped and jittered `image` (`REFERENCE_SCHEMAS`).

Symbols: B batch size of the stream, H = W = image size (px), T = tokenizer view size (px),
V = the host view's size (px: T in a stream with visual tokens, else H; the device derives the
model's H view from it), N = number of patches, L = text length (tokens), A = number of answers.

| stream / task | key                 | shape        | dtype   | meaning                                      |
|---------------|---------------------|--------------|---------|----------------------------------------------|
| image         | image               | (B, V, V, 3) | uint8   | cropped, resized view (no flip, no jitter)   |
|               | flip                | (B,)         | bool    | mirror left-right (done on the device)       |
|               | jitter              | (B, 3)       | float32 | jitter factors: brightness, contrast, sat.   |
|               | jitter_order        | (B, 3)       | int32   | the jitter ops' ids in application order     |
|               | image_mask          | (B, N)       | bool    | True = patch masked (block-wise, exact count)|
| text          | text_ids            | (B, L)       | int32   | <s> pieces </s> <pad>..., masked tokens in   |
|               | text_padding_mask   | (B, L)       | bool    | True = padding                               |
|               | text_targets        | (B, L)       | int32   | the original ids (loss where text_mask)      |
|               | text_mask           | (B, L)       | bool    | True = masked position (predict it)          |
| pair          | image, flip, jitter, jitter_order, image_mask, text_ids, text_padding_mask, text_targets, text_mask |
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of a batch: its shape in symbols (see the module table) and dtype."""
  dims: tuple[str, ...]
  dtype: str
  doc: str


IMAGE = Field(('B', 'H', 'W', 3), 'uint8', 'augmented image')
_TOKENIZER_IMAGE = Field(('B', 'T', 'T', 3), 'uint8', 'same crop, for the visual tokenizer')
_IMAGE_MASK = Field(('B', 'N'), 'bool', 'True = masked patch')
TEXT = {
    'text_ids': Field(('B', 'L'), 'int32', 'token ids'),
    'text_padding_mask': Field(('B', 'L'), 'bool', 'True = padding'),
}
MASKED_TEXT = {
    'text_targets': Field(('B', 'L'), 'int32', 'original ids'),
    'text_mask': Field(('B', 'L'), 'bool', 'True = masked position'),
}
LABEL = Field(('B',), 'int32', 'class index')

_JITTER = {'flip': Field(('B',), 'bool', 'mirror the image left-right'),
           'jitter': Field(('B', 3), 'float32', 'colour-jitter factors by op'),
           'jitter_order': Field(('B', 3), 'int32', 'colour-jitter ops in order')}

_HOST_VIEW = Field(('B', 'V', 'V', 3), 'uint8', 'the one host-made view (no flip or jitter)')

SCHEMAS: dict[str, dict[str, Field]] = {
    'image': {'image': _HOST_VIEW, **_JITTER, 'image_mask': _IMAGE_MASK},
    'text': {**TEXT, **MASKED_TEXT},
    'pair': {'image': _HOST_VIEW, **_JITTER, 'image_mask': _IMAGE_MASK, **TEXT, **MASKED_TEXT},
}
# The host reference (`PretrainInputs(views_on_device=False)`): both views made on the host.
REFERENCE_SCHEMAS: dict[str, dict[str, Field]] = {
    'image': {'image': IMAGE, 'tokenizer_image': _TOKENIZER_IMAGE, 'image_mask': _IMAGE_MASK},
    'text': SCHEMAS['text'],
    'pair': {'image': IMAGE, 'tokenizer_image': _TOKENIZER_IMAGE, 'image_mask': _IMAGE_MASK,
             **TEXT, **MASKED_TEXT},
}

PRETRAINING_STREAMS = ('image', 'text', 'pair')


def _layout(kind: str | Mapping[str, Field]) -> tuple[str, Mapping[str, Field]]:
  """(name, layout) of a pretraining stream name or of a layout given as such."""
  if not isinstance(kind, str):
    return 'the layout', kind
  if kind not in SCHEMAS:
    raise KeyError(f'Unknown batch kind {kind!r}; known: {sorted(SCHEMAS)}.')
  return kind, SCHEMAS[kind]


def shapes(kind: str | Mapping[str, Field], sizes: Mapping[str, int]
           ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Concrete (shape, dtype) of every key of a stream or task, given the symbol sizes.

  Args:
    kind: a key of `SCHEMAS` ('image', 'text', 'pair'), or a layout such as a fine-tuning
      task's `batch_fields`.
    sizes: values of the symbols used by that kind, e.g. {'B': 8, 'H': 64, 'W': 64, 'T': 64,
      'N': 16}.
  """
  kind, layout = _layout(kind)
  out = {}
  for key, field in layout.items():
    dims = []
    for d in field.dims:
      if isinstance(d, int):
        dims.append(d)
      elif d in sizes:
        dims.append(int(sizes[d]))
      else:
        raise KeyError(f'{kind}.{key} needs the size of {d!r}; got sizes for {sorted(sizes)}.')
    out[key] = (tuple(dims), np.dtype(field.dtype))
  return out


def check(kind: str | Mapping[str, Field], batch: Mapping[str, np.ndarray],
          sizes: Mapping[str, int] | None = None):
  """Raises ValueError naming each key of `batch` that is missing, extra, or of the wrong
  dtype, rank or (when `sizes` gives the symbols) shape. `kind` as in `shapes`."""
  kind, schema = _layout(kind)
  problems = [f'missing {k}' for k in schema if k not in batch]
  problems += [f'unexpected {k}' for k in batch if k not in schema]
  for key, field in schema.items():
    if key not in batch:
      continue
    a = batch[key]
    if np.dtype(a.dtype) != np.dtype(field.dtype):
      problems.append(f'{key} has dtype {a.dtype}, expected {field.dtype}')
    if len(a.shape) != len(field.dims):
      problems.append(f'{key} has shape {tuple(a.shape)}, expected dims {field.dims}')
      continue
    for axis, d in enumerate(field.dims):
      want = d if isinstance(d, int) else (sizes or {}).get(d)
      if want is not None and a.shape[axis] != want:
        problems.append(f'{key} has shape {tuple(a.shape)}, expected {d}={want} on axis {axis}')
  if problems:
    raise ValueError(f'Batch of kind {kind!r} does not fit the schema: ' + '; '.join(problems))
