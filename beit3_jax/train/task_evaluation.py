"""Validation of the tasks whose metrics need the whole split: retrieval and captioning.

    evaluator = retrieval_evaluator(objective, examples, batch_size, text_len, tokenizer)
    metrics = evaluator(params, mesh)     # {'retrieval/i2t_r1': ..., 'retrieval/r_mean': ...}

Retrieval (unilm `beit3/engine_for_finetuning.py`, RetrievalHandler): every image of the
evaluated examples and every one of their captions are embedded by the image-only and
text-only passes; the (images x captions) cosine similarities give R@1/5/10 both ways
(`tasks.metrics.retrieval_recall`). Baseline: `retrieval/random_r1`, the R@1 of a random
ranking (captions per image / captions for i2t, 1 / images for t2i; their mean).

Captioning: captions are generated with the cache (`tasks.captioning.generate_captions`, beam
size, length penalty and max length from config) and scored against every reference caption
of the example with CIDEr-D and BLEU-4 (`tasks.metrics`). Baseline:
`captioning/baseline_cider`, the CIDEr-D of emitting one fixed caption for every image (the most
common caption of the training split).

Inputs are laid out like training batches: every batch of `batch_size` rows (the last one padded)
goes through `pipeline.to_global` from this host's block of rows, and the outputs are gathered
back to every host, so the evaluators run unchanged on several hosts.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from beit3_jax.data import image_ops, pipeline
from beit3_jax.data.finetuning import FinetuneInputs, caption_list, view
from beit3_jax.data.pretraining import load_image
from beit3_jax.tasks import metrics
from beit3_jax.tasks.captioning import generate_captions


def _host_block(rows: np.ndarray) -> np.ndarray:
  n = rows.shape[0] // jax.process_count()
  return rows[jax.process_index() * n:(jax.process_index() + 1) * n]


def _batched(fn: Callable, arrays: dict[str, np.ndarray], batch_size: int, mesh) -> np.ndarray:
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


def _read(source, count: int, inputs: FinetuneInputs, image_field: str, caption_field: str
          ) -> tuple[np.ndarray, list[list[str]]]:
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


def retrieval_evaluator(objective, source, count: int, batch_size: int, inputs: FinetuneInputs,
                        tokenizer, image_field: str = 'image',
                        caption_field: str = 'captions') -> Callable[[Any, Any], dict]:
  """(params, mesh) -> {'retrieval/{i2t,t2i}_r{1,5,10}', 'retrieval/r_mean',
  'retrieval/random_r1', 'retrieval/images', 'retrieval/texts'} over the first `count`
  examples of `source` (every caption of each)."""
  images, captions = _read(source, count, inputs, image_field, caption_field)
  texts = [t for group in captions for t in group]
  text_to_image = np.repeat(np.arange(len(captions)), [len(g) for g in captions])
  encoded = [tokenizer.encode_sequence(t, inputs.text_len) for t in texts]
  ids = np.stack([e[0] for e in encoded]).astype(np.int32)
  pad = np.stack([e[1] for e in encoded])

  # Compiled once per evaluator; the params are an argument (a closure would bake them into
  # every evaluation's program as constants and recompile each time).
  image_fn = jax.jit(lambda params, b: objective.apply(
      params, None, False, images=objective.images(b['image']))['image_features'])
  text_fn = jax.jit(lambda params, b: objective.apply(
      params, None, False, text_ids=b['text_ids'],
      text_padding_mask=b['text_padding_mask'])['text_features'])

  def evaluate(params, mesh) -> dict[str, float]:
    image_features = _batched(lambda b: image_fn(params, b), {'image': images}, batch_size,
                              mesh)
    text_features = _batched(lambda b: text_fn(params, b),
                             {'text_ids': ids, 'text_padding_mask': pad}, batch_size, mesh)
    similarity = image_features.astype(np.float64) @ text_features.astype(np.float64).T
    out = {f'retrieval/{k}': v for k, v in
           metrics.retrieval_recall(similarity, text_to_image).items()}
    per_image = np.mean([len(g) for g in captions])
    out['retrieval/random_r1'] = float(np.mean([per_image / len(texts), 1 / len(captions)]))
    out['retrieval/images'] = float(len(captions))
    out['retrieval/texts'] = float(len(texts))
    return out
  return evaluate


def most_common_caption(source, caption_field: str = 'captions') -> str:
  """The most frequent caption (exact text) of a split; ties: the first seen."""
  counts = collections.Counter()
  for i in range(len(source)):
    counts.update(caption_list(source[i], caption_field))
  if not counts:
    raise ValueError(f'The training split has no {caption_field!r}.')
  return counts.most_common(1)[0][0]


def captioning_evaluator(config, source, count: int, batch_size: int, inputs: FinetuneInputs,
                         tokenizer, baseline_caption: str, *, image_mean: Sequence[float],
                         image_std: Sequence[float], image_field: str = 'image',
                         caption_field: str = 'captions') -> Callable[[Any, Any], dict]:
  """(params, mesh) -> {'captioning/cider', 'captioning/bleu4', 'captioning/baseline_cider',
  'captioning/baseline_bleu4', 'captioning/images'} over the first `count` examples of
  `source`, generating with config.captioning.{beam_size, length_penalty, max_len}."""
  images, references = _read(source, count, inputs, image_field, caption_field)
  c = config.captioning
  ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id)
  last_examples: list[tuple[str, list[str]]] = []

  def evaluate(params, mesh) -> dict[str, float]:
    def generate(batch):
      return generate_captions(params, config.model,
                               image_ops.normalize(batch['image'], image_mean, image_std),
                               *ids, max_len=int(c.max_len), beam_size=int(c.beam_size),
                               length_penalty=float(c.length_penalty))
    tokens = _batched(generate, {'image': images}, batch_size, mesh)
    hypotheses = [tokenizer.decode(row) for row in tokens]
    last_examples[:] = list(zip(hypotheses[:8], references[:8]))
    baseline = [baseline_caption] * len(hypotheses)
    return {'captioning/cider': metrics.cider_d(hypotheses, references),
            'captioning/bleu4': metrics.bleu4(hypotheses, references),
            'captioning/baseline_cider': metrics.cider_d(baseline, references),
            'captioning/baseline_bleu4': metrics.bleu4(baseline, references),
            'captioning/images': float(len(hypotheses))}
  evaluate.examples = last_examples   # the last evaluation's first captions, for a look
  return evaluate
