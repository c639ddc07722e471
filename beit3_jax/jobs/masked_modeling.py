"""BEiT-3's pretraining objective: masked data modeling on images, texts and image-text pairs.

One step runs one backbone pass per stream, each with its static Multiway routing:

    image  (vision only)   MIM: predict the visual token of every masked patch
    text   (text only)     MLM: predict the original id of every masked text token (15%)
    pair   (image + text)  MLM on the caption (50% masked) and, when the data masks pair
                           patches, MIM on them ('pair_image')

Visual tokens come from the frozen VQ-KD tokenizer, run in the step on each example's
tokenizer view. Each task's loss is the mean softmax cross-entropy over its masked positions;
the total is sum_task weight_task * loss_task.

Masked positions are gathered into a fixed number of slots per example (`ObjectiveSpec`):
images mask an exact number of patches; a text row masks round(ratio * n) of its n real
tokens, at most `text_slots` (computed from the longest possible row). Losses are accumulated
as sums and divided by the number of masked positions of the whole batch, so gradient
accumulation over micro-batches gives the gradient of the whole batch.

Metrics per task: `loss`, `accuracy` (top-1 on masked positions) and `baseline_accuracy`, the
accuracy of always predicting the most frequent target of the same masked positions (of the
batch when training, of the whole validation split in evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import device_augment
from beit3_jax.data.masking import BlockMaskConfig, num_text_masked
from beit3_jax.models import num_patches
from beit3_jax.models.pretraining import BEiT3Pretraining, pretraining_example_inputs
from beit3_jax.losses import cross_entropy_sums, masked_slots, reduce_sums
from beit3_jax.tokenizers import vqkd as vqkd_lib

# task -> (stream, target kind)
TASKS = {'image': ('image', 'mim'), 'text': ('text', 'mlm'), 'pair': ('pair', 'mlm'),
         'pair_image': ('pair', 'mim')}


def summarize(sums: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """Task sums (with a `histogram`, or `baseline_correct` summed over steps) ->
  {'<task>/loss', '<task>/accuracy', '<task>/baseline_accuracy', '<task>/masked_tokens'}."""
  metrics = {}
  for task, s in sums.items():
    count = max(float(s['count']), 1.0)
    if 'histogram' in s:
      baseline = float(np.max(np.asarray(s['histogram'])))
    else:
      baseline = float(s['baseline_correct'])
    metrics[f'{task}/loss'] = float(s['ce']) / count
    metrics[f'{task}/accuracy'] = float(s['correct']) / count
    metrics[f'{task}/baseline_accuracy'] = baseline / count
    metrics[f'{task}/masked_tokens'] = float(s['count'])
  return metrics


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """Static shape facts of the objective.

  Attributes:
    image_slots: masked patches per image of the image stream (0: no image stream).
    pair_image_slots: masked patches per image of the pair stream (0: no pair MIM).
    text_slots: most masked tokens of a text-stream row.
    pair_text_slots: most masked tokens of a pair-stream caption.
    weights: task -> loss weight.
  """
  image_slots: int
  pair_image_slots: int
  text_slots: int
  pair_text_slots: int
  weights: Mapping[str, float]


def make_spec(model_cfg, text_len: int, image_mask_ratio: float, pair_image_mask_ratio: float,
              text_mask_ratio: float, pair_text_mask_ratio: float, weights: Mapping[str, float],
              streams) -> ObjectiveSpec:
  """The spec for data masked with these ratios (as `data.pretraining.PretrainInputs` does)."""
  n = num_patches(model_cfg)
  def image_slots(ratio):
    return BlockMaskConfig(ratio=ratio).num_masked(n) if ratio > 0 else 0
  candidates = text_len - 2  # <s> and </s> are never masked
  return ObjectiveSpec(
      image_slots=image_slots(image_mask_ratio) if 'image' in streams else 0,
      pair_image_slots=image_slots(pair_image_mask_ratio) if 'pair' in streams else 0,
      text_slots=num_text_masked(candidates, text_mask_ratio) if 'text' in streams else 0,
      pair_text_slots=num_text_masked(candidates, pair_text_mask_ratio) if 'pair' in streams
      else 0,
      weights=dict(weights))


class MaskedModeling:
  """The objective object the trainer drives (see `beit3_jax.trainer.step`).

  Params: the `BEiT3Pretraining` tree. Frozen inputs: {'tokenizer': VQ-KD params}.
  No extra state.
  """

  def __init__(self, model_cfg, tokenizer_cfg, spec: ObjectiveSpec):
    self.model_cfg = model_cfg
    self.tokenizer_cfg = tokenizer_cfg
    self.spec = spec
    self.model = BEiT3Pretraining(model_cfg, tokenizer_cfg.n_embed)
    self.tokenizer = vqkd_lib.VQKD(tokenizer_cfg)
    grid = model_cfg.img_size // model_cfg.patch_size
    if vqkd_lib.token_grid(tokenizer_cfg) != (grid, grid):
      raise ValueError(
          f'The visual tokenizer gives a {vqkd_lib.token_grid(tokenizer_cfg)} token grid, the '
          f'model has a {grid}x{grid} patch grid: set the tokenizer\'s input_size to '
          f'{vqkd_lib.tokenizer_view_size(grid, tokenizer_cfg.patch_size)}.')

  @property
  def tasks(self) -> tuple[str, ...]:
    s = self.spec
    present = {'image': s.image_slots, 'text': s.text_slots, 'pair': s.pair_text_slots,
               'pair_image': s.pair_image_slots}
    return tuple(t for t in TASKS if present[t] > 0)

  def init_params(self, rng):
    """Boxed params (logical axis names on every leaf)."""
    return self.model.init(rng, **pretraining_example_inputs(self.model_cfg))['params']

  def init_extra(self, params):
    del params
    return {}

  def _slots(self, batch):
    s = self.spec
    slots = {}
    if 'image' in self.tasks:
      slots['image'] = masked_slots(batch['image']['image_mask'], s.image_slots)
    if 'text' in self.tasks:
      slots['text'] = masked_slots(batch['text']['text_mask'], s.text_slots)
    if 'pair' in self.tasks:
      slots['pair'] = masked_slots(batch['pair']['text_mask'], s.pair_text_slots)
    if 'pair_image' in self.tasks:
      slots['pair_image'] = masked_slots(batch['pair']['image_mask'], s.pair_image_slots)
    return slots

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Masked positions per task in `batch` (the loss denominators), float32 scalars."""
    return {task: jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
            for task, (_, valid) in self._slots(batch).items()}

  def _images(self, stream_batch, visual_tokens: bool = True):
    """(model input, tokenizer input or None) float32 of an image stream's batch: the colour
    jitter and the model's view are finished here, on the device (`device_augment`)."""
    return device_augment.finish_images(
        stream_batch, model_size=self.model_cfg.img_size,
        tokenizer_size=self.tokenizer_cfg.input_size if visual_tokens else None)

  def _visual_tokens(self, frozen, views):
    ids = self.tokenizer.apply({'params': frozen['tokenizer']}, views,
                               method=vqkd_lib.VQKD.encode)
    return jax.lax.stop_gradient(ids)

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    """(total loss, (per-task sums, extra)) of one (micro-)batch."""
    del extra
    slots = self._slots(batch)
    rngs = {'drop_path': rng} if train else None
    sums = {}

    def apply(**kwargs):
      return self.model.apply({'params': params}, deterministic=not train, rngs=rngs, **kwargs)

    if 'image' in slots:
      b = batch['image']
      index, valid = slots['image']
      images, views = self._images(b)
      tokens = self._visual_tokens(frozen, views)
      out = apply(images=images, image_mask=b['image_mask'],
                  image_index=index)
      sums['image'] = cross_entropy_sums(out['mim_logits'],
                                         jnp.take_along_axis(tokens, index, axis=1), valid,
                                         self.tokenizer_cfg.n_embed)
    if 'text' in slots:
      b = batch['text']
      index, valid = slots['text']
      out = apply(text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'],
                  text_index=index)
      sums['text'] = cross_entropy_sums(out['mlm_logits'],
                                        jnp.take_along_axis(b['text_targets'], index, axis=1),
                                        valid, self.model_cfg.vocab_size)
    if 'pair' in slots:
      b = batch['pair']
      index, valid = slots['pair']
      pair_mim = 'pair_image' in slots
      images, views = self._images(b, visual_tokens=pair_mim)
      out = apply(images=images,
                  image_mask=b['image_mask'] if pair_mim else None,
                  text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'],
                  text_index=index, image_index=slots['pair_image'][0] if pair_mim else None)
      sums['pair'] = cross_entropy_sums(out['mlm_logits'],
                                        jnp.take_along_axis(b['text_targets'], index, axis=1),
                                        valid, self.model_cfg.vocab_size)
      if pair_mim:
        index, valid = slots['pair_image']
        tokens = self._visual_tokens(frozen, views)
        sums['pair_image'] = cross_entropy_sums(
            out['mim_logits'], jnp.take_along_axis(tokens, index, axis=1), valid,
            self.tokenizer_cfg.n_embed)
    total = sum(float(self.spec.weights.get(t, 1.0)) * s['ce'] / normalizers[t]
                for t, s in sums.items())
    return total, (sums, {})

  def finish(self, params, extra):
    """Post-update hook (nothing to do for masked modeling)."""
    return params, extra

  def reduce(self, sums):
    return reduce_sums(sums)

  def summarize(self, sums) -> dict[str, float]:
    return summarize(sums)
