"""Fine-tuning inputs: per-example transforms of every task (classification, VQA, NLVR2,
retrieval, captioning).

Batch layouts are those of `beit3_jax.data.schema` ('classification', 'vqa'); images stay uint8
on the host and are normalised on the device (0.5 / 0.5, `image_ops.normalize`).

- train (the VL recipe of unilm `beit3/datasets.py`): random resized crop (scale
  `crop_scale`, default 0.5-1) -> horizontal flip (p 0.5);
- eval: a plain resize to (image_size, image_size).
- VQA text: `<s>` question `</s>` padded to `text_len` (the .spm `TextTokenizer`). The target
  is a soft-score vector over the answer vocabulary: either unilm's VQAv2 scores (the
  example's `answer_ids` + `answer_scores` fields, 0.3 / 0.6 / 0.9 / 1.0 by annotator count,
  as `beit3_jax.data.builders.vqa_nlvr2` stores them) or 1.0 on the one answer given (the
  built-in data). An example of the built-in data holds several questions; each pass picks
  one with the example's rng (train and eval alike, so the validation batches are the same
  every time for a fixed seed).

- NLVR2: both images get the view (independent crops), the statement is encoded once.
- Retrieval: one caption per pass (the example's rng picks it); evaluation reads every caption
  (`caption_list`).
- Captioning (unilm "masked fine-tuning"): `mask_caption` picks k = max(1, min(round(n p),
  n - 1)) of the positions 1..n-1 of the n real tokens (never <s>) and replaces each by [MASK]
  80%, itself 10%, a random id in [3, vocab size) 10%.

Examples the transform cannot use (undecodable image, empty question, answer out of the
vocabulary) are skipped and counted by the pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

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
  """
  image_size: int
  train: bool
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip_prob: float = 0.5
  interpolation: str = 'bicubic'
  text_len: int = 32


def view(cfg: FinetuneInputs, image, rng: np.random.Generator) -> np.ndarray:
  """uint8 (S, S, 3): the training crop + flip, or the eval resize."""
  if cfg.train:
    out = image_ops.random_resized_crop(rng, image, cfg.image_size, tuple(cfg.crop_scale),
                                        interpolation=cfg.interpolation)
    return image_ops.horizontal_flip(rng, out, cfg.flip_prob)
  return image_ops.eval_resize(image, cfg.image_size, cfg.interpolation)


def classification_transform(cfg: FinetuneInputs, num_classes: int, image_field: str = 'image',
                             label_field: str = 'label') -> pipeline.Transform:
  """(example with an image and an int label, rng) -> {'image' uint8, 'label' int32}."""
  def transform(example, rng):
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      return image
    label = int(np.asarray(get_field(example, label_field)))
    if not 0 <= label < num_classes:
      return pipeline.Skip('label out of range')
    return {'image': view(cfg, image, rng), 'label': np.int32(label)}
  return transform


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _as_list(value) -> list:
  if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
    return [value]
  return list(value)


def vqa_transform(cfg: FinetuneInputs, tokenizer: TextTokenizer, answers: Sequence[str],
                  image_field: str = 'image', question_field: str = 'qa/question',
                  answer_field: str = 'qa/answer', answer_ids_field: str = '',
                  answer_scores_field: str = '') -> pipeline.Transform:
  """(example with an image and question(s) + answer(s), rng) -> the 'vqa' layout:
  {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (A,) float32}.

  Targets, by the fields given:
    answer_scores_field (and answer_ids_field) set: soft scores. The example holds one
      question; `answer_ids` are indices into `answers` and `answer_scores` their scores
      (unilm's VQAv2 targets). In training a question without any scored answer is skipped
      (unilm drops those); in evaluation it is kept with all-zero scores, so it counts as
      wrong, as in the official VQA accuracy.
    otherwise: one-hot on `answer_field`, matched to `answers` by its text (so any answer
      vocabulary works); an answer outside the vocabulary is skipped.

  Raises (when called):
    ValueError: an answer id outside `answers` (the data was built with another vocabulary),
      or soft scores with several questions per example.
  """
  index = {a: i for i, a in enumerate(answers)}
  soft = bool(answer_scores_field)
  if soft and not answer_ids_field:
    raise ValueError('VQA soft scores need both fields: answer_ids and answer_scores '
                     '(config.data.fields).')

  def targets(example, questions):
    if not soft:
      given = [_as_str(a).strip() for a in _as_list(get_field(example, answer_field))]
      if len(questions) != len(given):
        return pipeline.Skip('no question')
      return given
    if len(questions) != 1:
      raise ValueError(f'VQA soft scores ({answer_ids_field!r}, {answer_scores_field!r}) need '
                       f'one question per example; this one has {len(questions)} in '
                       f'{question_field!r}.')
    ids = np.asarray(get_field(example, answer_ids_field), np.int64).reshape(-1)
    scores = np.asarray(get_field(example, answer_scores_field), np.float32).reshape(-1)
    if len(ids) != len(scores):
      return pipeline.Skip('answer_ids and answer_scores differ in length')
    outside = ids[(ids < 0) | (ids >= len(answers))]
    if len(outside):
      raise ValueError(f'Answer id {int(outside[0])} in {answer_ids_field!r} is outside the '
                       f'answer vocabulary of '
                       f'{len(answers)} answers: config.answers is not the vocabulary the data '
                       'was built with (its answer_vocabulary.json).')
    if cfg.train and not len(ids):
      return pipeline.Skip('no answer in the vocabulary')
    vector = np.zeros((len(answers),), np.float32)
    vector[ids] = scores
    return [vector]

  def transform(example, rng):
    questions = [_as_str(q).strip() for q in _as_list(get_field(example, question_field))]
    if not questions:
      return pipeline.Skip('no question')
    given = targets(example, questions)
    if isinstance(given, pipeline.Skip):
      return given
    k = int(rng.integers(len(questions)))
    question, answer = questions[k], given[k]
    if not question:
      return pipeline.Skip('empty question')
    if soft:
      scores = answer
    else:
      if answer not in index:
        return pipeline.Skip('answer not in vocabulary')
      scores = np.zeros((len(answers),), np.float32)
      scores[index[answer]] = 1.0
    image = load_image(example, image_field)
    if isinstance(image, pipeline.Skip):
      return image
    ids, pad = tokenizer.encode_sequence(question, cfg.text_len)
    return {'image': view(cfg, image, rng), 'text_ids': ids.astype(np.int32),
            'text_padding_mask': pad, 'answer_scores': scores}
  return transform


def _statement_fields(example, field: str) -> str:
  return _as_str(get_field(example, field)).strip()


def nlvr2_transform(cfg: FinetuneInputs, tokenizer: TextTokenizer, image_a_field: str = 'image_a',
                    image_b_field: str = 'image_b', statement_field: str = 'statement',
                    label_field: str = 'label') -> pipeline.Transform:
  """(example with two images, a statement and a 0/1 label, rng) -> the 'nlvr2' layout."""
  def transform(example, rng):
    statement = _statement_fields(example, statement_field)
    if not statement:
      return pipeline.Skip('empty statement')
    images = []
    for field in (image_a_field, image_b_field):
      image = load_image(example, field)
      if isinstance(image, pipeline.Skip):
        return image
      images.append(view(cfg, image, rng))
    label = int(np.asarray(get_field(example, label_field)))
    if label not in (0, 1):
      return pipeline.Skip('label not 0/1')
    ids, pad = tokenizer.encode_sequence(statement, cfg.text_len)
    return {'image_a': images[0], 'image_b': images[1], 'text_ids': ids.astype(np.int32),
            'text_padding_mask': pad, 'label': np.int32(label)}
  return transform


def caption_list(example, field: str = 'captions') -> list[str]:
  """The non-empty captions of an example (str)."""
  return [c for c in (_as_str(x).strip() for x in _as_list(get_field(example, field))) if c]


def _caption_example(cfg: FinetuneInputs, tokenizer: TextTokenizer, example, rng,
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


def retrieval_transform(cfg: FinetuneInputs, tokenizer: TextTokenizer, image_field: str = 'image',
                        caption_field: str = 'captions') -> pipeline.Transform:
  """(example with an image and caption(s), rng) -> the 'retrieval' layout (one caption)."""
  def transform(example, rng):
    out = _caption_example(cfg, tokenizer, example, rng, image_field, caption_field)
    if isinstance(out, pipeline.Skip):
      return out
    image, ids, pad = out
    return {'image': view(cfg, image, rng), 'text_ids': ids, 'text_padding_mask': pad}
  return transform


def mask_caption(ids: np.ndarray, padding: np.ndarray, rng: np.random.Generator,
                 mask_prob: float, mask_id: int, random_low: int, random_high: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(masked input ids, mask (L,) bool) of one encoded caption (`ids` (L,) int32 with <s> at 0,
  `padding` True at pads): unilm's captioning masking, see the module doc."""
  n = int(np.sum(~padding))
  k = max(1, min(int(round(n * mask_prob)), n - 1))
  chosen = 1 + rng.choice(n - 1, size=k, replace=False)
  mask = np.zeros(ids.shape, bool)
  mask[chosen] = True
  out = ids.copy()
  u = rng.random(k)
  out[chosen[u < 0.8]] = mask_id
  rand = chosen[u >= 0.9]
  out[rand] = rng.integers(random_low, random_high, size=rand.size)
  return out.astype(np.int32), mask


def captioning_transform(cfg: FinetuneInputs, tokenizer: TextTokenizer, mask_prob: float,
                         image_field: str = 'image', caption_field: str = 'captions'
                         ) -> pipeline.Transform:
  """(example with an image and caption(s), rng) -> the 'captioning' layout: one caption,
  masked (`text_ids`), with `text_targets` (the caption) and `text_mask`."""
  def transform(example, rng):
    out = _caption_example(cfg, tokenizer, example, rng, image_field, caption_field)
    if isinstance(out, pipeline.Skip):
      return out
    image, ids, pad = out
    # unilm: random.randint(3, len(tokenizer) - 1), both ends included.
    masked, mask = mask_caption(ids, pad, rng, mask_prob, tokenizer.mask_id, 3,
                                tokenizer.vocab_size)
    return {'image': view(cfg, image, rng), 'text_ids': masked, 'text_padding_mask': pad,
            'text_targets': ids, 'text_mask': mask}
  return transform


def make_stream_mixture(name: str, source: Any, transform: pipeline.Transform,
                        global_batch: int, seed: int, *, num_epochs: int | None = None,
                        read_threads: int = 2) -> pipeline.Mixture:
  """A one-stream mixture `{name: batch}` (the trainer's resumable data object)."""
  return pipeline.Mixture({name: pipeline.Stream(source, transform, global_batch=global_batch,
                                                 seed=seed, num_epochs=num_epochs,
                                                 read_threads=read_threads)})


def field_overrides(fields: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict:
  return {**defaults, **dict(fields or {})}
