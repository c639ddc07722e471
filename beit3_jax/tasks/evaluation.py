"""What the whole-split evaluators share (a task's `Task.evaluator`, e.g. retrieval's R@k and
captioning's CIDEr-D): reading a split's captioned images, and running a function over every
example of it in global batches.

    evaluator = task.evaluator(config, objective, eval_source, train_source, tokenizer, fields)
    metrics = evaluator(params, mesh)     # e.g. {'retrieval/i2t_r1': ..., 'retrieval/r_mean': ...}

Inputs are laid out like training batches: every batch of `batch_size` rows (the last one padded)
goes through `pipeline.to_global` from this host's block of rows, and the outputs are gathered
back to every host, so the evaluators run unchanged on several hosts.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from beit3_jax.data import pipeline
from beit3_jax.data.finetuning import FinetuneInputs, caption_list, view
from beit3_jax.data.pretraining import load_image


def eval_inputs(config) -> FinetuneInputs:
  """The evaluation view of a fine-tuning config's images and texts."""
  return FinetuneInputs.from_config(config, train=False)


def _host_block(rows: np.ndarray) -> np.ndarray:
  n = rows.shape[0] // jax.process_count()
  return rows[jax.process_index() * n:(jax.process_index() + 1) * n]


def batched(fn: Callable, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> np.ndarray:
  """fn(global batch dict) for every batch of `batch_size` rows (the last padded by repeating
  row 0), gathered and concatenated on the host: (N, ...) numpy."""
  n = next(iter(arrays.values())).shape[0]
  outs = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
    m = next(iter(chunk.values())).shape[0]
    if m < batch_size:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - m, 0)]) for k, v in
               chunk.items()}
    out = fn(pipeline.to_global({k: _host_block(v) for k, v in chunk.items()}, mesh))
    out = multihost_utils.process_allgather(out, tiled=True)
    outs.append(np.asarray(out)[:m])
  return np.concatenate(outs)


def read_captioned(source, count: int, inputs: FinetuneInputs, image_field: str,
                   caption_field: str) -> tuple[np.ndarray, list[list[str]]]:
  """(images uint8 (N, S, S, 3) in the eval view, captions of each) of the first `count`
  examples of `source` that have an image and a caption (all of them if count <= 0)."""
  images, captions = [], []
  total = len(source) if count <= 0 else min(count, len(source))
  for i in range(total):
    example = source[i]
    texts = caption_list(example, caption_field)
    image = load_image(example, image_field)
    if not texts or isinstance(image, pipeline.Skip):
      continue
    images.append(view(inputs, image, np.random.default_rng(0)))
    captions.append(texts)
  if not images:
    raise ValueError(f'No example of the evaluation split has both {image_field!r} and '
                     f'{caption_field!r}.')
  return np.stack(images), captions
