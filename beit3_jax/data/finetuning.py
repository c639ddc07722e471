"""Fine-tuning inputs: what every task's per-example transform shares.

Each task's transform lives in its module (`beit3_jax.tasks.<task>.transform`) and returns its
batch layout (`Task.batch_fields`); images stay uint8 on the host and are normalised on the
device (`image_ops.normalize`).

- train (the VL recipe of unilm `beit3/datasets.py`): random resized crop (scale `crop_scale`,
  default 0.5-1) -> horizontal flip (p `flip_prob`), `view`;
- eval: a plain resize to (image_size, image_size) (unilm's vision-language tasks), or with
  `eval_crop_pct` > 0 the shorter side to int(image_size / eval_crop_pct) and a centre crop
  (unilm's ImageNet eval, `build_imagenet_transform`, crop_pct 1.0 when not given).
- Texts: `<s>` text `</s>` padded to `text_len` (the .spm `TextTokenizer`); `caption_example`
  picks one caption of an example with the example's rng, `caption_list` gives all of them.

Examples a transform cannot use (undecodable image, empty text, out-of-range label) are skipped
(`pipeline.Skip`) and counted by the pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from beit3_jax.data import image_ops, pipeline
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.data.text import TextTokenizer


@dataclasses.dataclass(frozen=True)
class FinetuneInputs:
  """Per-example settings.

  Attributes:
    image_size: model view side (px).
    train: augment (random resized crop + flip) or not (plain resize).
    crop_scale: RandomResizedCrop area range.
    flip_prob: horizontal flip probability in training.
    interpolation: resampling of crops and resizes.
    text_len: tokens per question, with <s> and </s> (VQA).
    eval_crop_pct: 0 = the eval view is a plain resize; > 0 = shorter side to
      int(image_size / eval_crop_pct), then a centre crop (`image_ops.eval_view`).
  """
  image_size: int
  train: bool
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip_prob: float = 0.5
  interpolation: str = 'bicubic'
  text_len: int = 32
  eval_crop_pct: float = 0.0

  @classmethod
  def from_config(cls, config, train: bool) -> 'FinetuneInputs':
    """The settings of a fine-tuning config (`config.model.img_size`, `config.data.*`)."""
    d = config.data
    return cls(image_size=config.model.img_size, train=train, crop_scale=tuple(d.crop_scale),
               text_len=d.text_len, flip_prob=float(d.flip_prob),
               eval_crop_pct=float(d.eval_crop_pct))


def view(cfg: FinetuneInputs, image, rng: np.random.Generator) -> np.ndarray:
  """uint8 (S, S, 3): the training crop + flip, or the eval view."""
  if cfg.train:
    out = image_ops.random_resized_crop(rng, image, cfg.image_size, tuple(cfg.crop_scale),
                                        interpolation=cfg.interpolation)
    return image_ops.horizontal_flip(rng, out, cfg.flip_prob)
  return image_ops.eval_view(image, cfg.image_size, cfg.eval_crop_pct, cfg.interpolation)


def as_str(value) -> str:
  """A text field as str (TFDS gives bytes)."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def as_list(value) -> list:
  """A field that holds one value or a sequence of them, as a list."""
  if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
    return [value]
  return list(value)


def caption_list(example, field: str = 'captions') -> list[str]:
  """The non-empty captions of an example (str)."""
  return [c for c in (as_str(x).strip() for x in as_list(get_field(example, field))) if c]


def caption_example(cfg: FinetuneInputs, tokenizer: TextTokenizer, example, rng,
                     image_field: str, caption_field: str):
  """(decoded image, ids, padding mask) of one caption of the example (picked with `rng`), or
  a Skip. Callers take the view last, after any other draw from `rng`."""
  captions = caption_list(example, caption_field)
  if not captions:
    return pipeline.Skip('no caption')
  image = load_image(example, image_field)
  if isinstance(image, pipeline.Skip):
    return image
  ids, pad = tokenizer.encode_sequence(captions[int(rng.integers(len(captions)))], cfg.text_len)
  return image, ids.astype(np.int32), pad


def make_stream_mixture(name: str, source: Any, transform: pipeline.Transform,
                        global_batch: int, seed: int, *, num_epochs: int | None = None,
                        read_threads: int = 2, workers: int = 0,
                        on_bad_example: str = 'skip') -> pipeline.Mixture:
  """A one-stream mixture `{name: batch}` (the trainer's resumable data object)."""
  return pipeline.Mixture({name: pipeline.Stream(
      source, transform, global_batch=global_batch, seed=seed, num_epochs=num_epochs,
      on_bad_example=on_bad_example, name=name)}, workers=workers, read_threads=read_threads)


def field_overrides(fields: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict:
  """Where a task's inputs live in an example: `defaults`, overridden by `fields`."""
  return {**defaults, **dict(fields or {})}
