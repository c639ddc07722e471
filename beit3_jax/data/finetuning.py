"""Fine-tuning inputs: what every task's per-example transform shares.

Each task's transform lives in its module (`beit3_jax.tasks.<task>.transform`) and returns its
batch layout (`Task.batch_fields`); images stay uint8 on the host and are normalised on the
device (`image_ops.normalize`).

- train (the VL recipe of unilm `beit3/datasets.py`): random resized crop (scale `crop_scale`,
  default 0.5-1) -> horizontal flip (p `flip_prob`) -> the `rand_augment` ops ('' none, 'unilm'
  = unilm's RandomAugment(2, 7) of VQA / captioning, or a timm string such as
  'rand-m9-mstd0.5-inc1' of its ImageNet recipe; `beit3_jax.data.augment`), `view`. With
  `rand_augment` '' the crop and flip draws are those of a view without it. timm's random
  erasing (`data.random_erasing`) acts on the normalised image, so it runs on the device
  (`random_erasing`, `augment.erase_on_device`);
- eval: a plain resize to (image_size, image_size) (unilm's vision-language tasks), or with
  `eval_crop_pct` > 0 the shorter side to int(image_size / eval_crop_pct) and a centre crop
  (unilm's ImageNet eval, `build_imagenet_transform`, crop_pct 1.0 when not given).
- Texts: `<s>` text `</s>` padded to `text_len` (the .spm `TextTokenizer`); `caption_example`
  picks one caption of an example with the example's rng, `caption_list` gives all of them.
  `CaptionPairs` makes a source of one example per (image, caption) pair (unilm's retrieval and
  captioning training sets; `data.caption_pairs`), each holding only its caption.

Examples a transform cannot use (undecodable image, empty text, out-of-range label) are skipped
(`pipeline.Skip`) and counted by the pipeline.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import numpy as np

from beit3_jax.data import augment, image_ops, pipeline
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
    rand_augment: training ops after the flip: '' (none), 'unilm[-n<ops>-m<magnitude>]' or a
      timm RandAugment string (`augment.make_augmenter`).
    image_mean: normalisation mean, [0, 1] units: timm's ops fill with round(255 * mean).
  """
  image_size: int
  train: bool
  crop_scale: tuple[float, float] = (0.5, 1.0)
  flip_prob: float = 0.5
  interpolation: str = 'bicubic'
  text_len: int = 32
  eval_crop_pct: float = 0.0
  rand_augment: str = ''
  image_mean: tuple[float, float, float] = image_ops.BEIT3_MEAN

  def __post_init__(self):
    self.augmenter()   # a bad rand_augment string fails here, naming the field

  def augmenter(self):
    """The training ops after the flip (`augment.make_augmenter`), or None."""
    return augment.make_augmenter(str(self.rand_augment), augment.mean_fill(self.image_mean),
                                  self.interpolation)

  @classmethod
  def from_config(cls, config, train: bool) -> 'FinetuneInputs':
    """The settings of a fine-tuning config (`config.model.img_size`, `config.data.*`)."""
    d = config.data
    random_erasing(config)   # checked with the other data fields
    return cls(image_size=config.model.img_size, train=train, crop_scale=tuple(d.crop_scale),
               text_len=d.text_len, flip_prob=float(d.flip_prob),
               eval_crop_pct=float(d.eval_crop_pct), rand_augment=str(d.get('rand_augment', '')),
               image_mean=tuple(float(x) for x in d.get('image_mean', image_ops.BEIT3_MEAN)))


def random_erasing(config) -> augment.RandomErasing | None:
  """timm's RandomErasing of a fine-tuning config (`data.random_erasing*`), or None when its
  probability is 0; the objective applies it on the device to normalised training images
  (`augment.erase_on_device`). Raises ValueError naming the field for a bad value."""
  d = config.data
  prob = float(d.get('random_erasing', 0.0))
  if prob == 0:
    return None
  count = d.get('random_erasing_count', 1)
  if isinstance(count, bool) or int(count) != count or count < 1:
    raise ValueError(f'data.random_erasing_count={count!r}: expected an int >= 1')
  return augment.RandomErasing(prob=prob, mode=str(d.get('random_erasing_mode', 'pixel')),
                                max_count=int(count))


def view(cfg: FinetuneInputs, image, rng: np.random.Generator) -> np.ndarray:
  """uint8 (S, S, 3): the training crop + flip + `rand_augment` ops, or the eval view."""
  if cfg.train:
    out = image_ops.random_resized_crop(rng, image, cfg.image_size, tuple(cfg.crop_scale),
                                        interpolation=cfg.interpolation)
    out = image_ops.horizontal_flip(rng, out, cfg.flip_prob)
    augmenter = cfg.augmenter()
    return out if augmenter is None else augmenter(rng, out)
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


# Examples read at once when caption counts are read from a TFDS source.
_COUNT_CHUNK = 512


class CaptionPairs:
  """A random-access source with one element per (example, caption) of `source` (unilm's
  retrieval and captioning training sets have one item per image-caption pair).

  Element k is the k-th pair in (example i, caption j) order: example i of `source` with its
  `caption_field` holding only its j-th non-empty caption, as a one-element list of str, so
  `caption_example` picks that caption. `len` = the non-empty captions of all examples; a
  shuffled epoch of it covers every caption once and an image once per caption. Examples
  without a caption have no element. Picklable when `source` is (worker processes).

  Args:
    source: random access (`len(source)`, `source[i]` -> example dict), e.g. a TFDS data
      source.
    caption_field: where the captions live in an example ('captions', 'captions/text').
    counts: int (len(source),): captions per example, if known; default `caption_counts`.
  """

  def __init__(self, source, caption_field: str = 'captions', counts=None):
    self.source = source
    self.caption_field = caption_field
    counts = caption_counts(source, caption_field) if counts is None else np.asarray(counts)
    if counts.shape != (len(source),) or not np.issubdtype(counts.dtype, np.integer) or (
        counts < 0).any():
      raise ValueError(f'CaptionPairs counts: expected {len(source)} ints >= 0, one per '
                       f'example, got shape {counts.shape} dtype {counts.dtype}.')
    # starts[i] = the first pair of example i; starts[-1] = the number of pairs.
    self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    if self._starts[-1] == 0:
      raise ValueError(f'No example of {source} has a caption in field {caption_field!r}; '
                       'set data.fields to where its captions live.')

  def __len__(self) -> int:
    return int(self._starts[-1])

  def pair(self, k: int) -> tuple[int, int]:
    """(example index, caption index) of element k."""
    if not 0 <= k < len(self):
      raise IndexError(f'pair {k} out of range for {len(self)} pairs')
    i = int(np.searchsorted(self._starts, k, side='right')) - 1
    return i, int(k - self._starts[i])

  def __getitem__(self, k):
    i, j = self.pair(k.__index__())
    example = self.source[i]
    captions = caption_list(example, self.caption_field)
    return _with_field(example, self.caption_field, captions[j:j + 1])

  def __str__(self) -> str:
    return (f'CaptionPairs({len(self)} (example, caption) pairs of the {len(self.source)} '
            f'examples of {self.source}, captions {self.caption_field!r})')

  __repr__ = __str__


def _with_field(example, path: str, value):
  """A copy of `example` (nested dicts copied along `path` 'a/b' only) with `path` = value."""
  head, _, rest = path.partition('/')
  if not isinstance(example, Mapping) or head not in example:
    get_field(example, path)   # raises, naming the path and the keys there
  out = dict(example)
  out[head] = _with_field(example[head], rest, value) if rest else value
  return out


def caption_counts(source, caption_field: str = 'captions') -> np.ndarray:
  """int64 (len(source),): the non-empty captions of each example (`caption_list`).

  A TFDS source whose caption field has a fixed length (a `Sequence(Text(), length=C)`, or one
  `Text`) gives it without reading (empty captions there are skipped by the transform); else a
  TFDS array_record source reads every record once with its images left encoded, and any other
  source reads `source[i]` for every i. Prints the examples read and the seconds it took.
  """
  n = len(source)
  fixed = _fixed_caption_count(source, caption_field)
  if fixed is not None:
    return np.full(n, fixed, np.int64)
  start = time.perf_counter()
  reader = _tfds_reader(source)
  counts = np.zeros(n, np.int64)
  for lo in range(0, n, _COUNT_CHUNK):
    indices = range(lo, min(n, lo + _COUNT_CHUNK))
    examples = (reader.__getitems__(indices) if reader is not None
                else [source[i] for i in indices])
    counts[lo:lo + len(examples)] = [len(caption_list(e, caption_field)) for e in examples]
  print(f'Counted {int(counts.sum())} captions ({caption_field!r}) of the {n} examples of '
        f'{source} in {time.perf_counter() - start:.1f} s', flush=True)
  return counts


def _tfds_features(source):
  """The TFDS FeaturesDict of a TFDS data source, or None for another source."""
  info = getattr(source, 'dataset_info', None)
  return getattr(info, 'features', None)


def _fixed_caption_count(source, caption_field: str) -> int | None:
  """Captions per example that a TFDS source's features fix (see `caption_counts`), or None."""
  features = _tfds_features(source)
  if features is None:
    return None
  try:
    info = features.get_tensor_info()
    for key in caption_field.split('/'):
      info = info[key]
  except (KeyError, TypeError, AttributeError):
    return None
  shape = getattr(info, 'shape', None)
  if shape == ():
    return 1
  if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
    return shape[0]
  return None


def _tfds_reader(source):
  """A copy of a TFDS array_record data source that leaves images encoded (nothing else of
  an example is decoded at a cost), or None for another source."""
  features = _tfds_features(source)
  if (features is None or getattr(source, 'decoders', None)
      or not dataclasses.is_dataclass(source) or not hasattr(source, '__getitems__')):
    return None
  import tensorflow_datasets as tfds

  def skip_images(feature):
    if isinstance(feature, tfds.features.Image):
      return tfds.decode.SkipDecoding()
    if isinstance(feature, tfds.features.Sequence):
      return skip_images(feature.feature)
    if isinstance(feature, tfds.features.FeaturesDict):
      out = {k: skip_images(v) for k, v in feature.items()}
      return {k: v for k, v in out.items() if v is not None} or None
    return None
  return dataclasses.replace(source, decoders=skip_images(features))


def make_stream_mixture(name: str, source: Any, transform: pipeline.Transform,
                        global_batch: int, seed: int, *, num_epochs: int | None = None,
                        read_threads: int = 2, workers: int = 0,
                        on_bad_example: str = 'skip',
                        pad_final_batch: bool = False) -> pipeline.Mixture:
  """A one-stream mixture `{name: batch}` (the trainer's resumable data object);
  `pad_final_batch`: a validation epoch whose examples carry `valid` (`pipeline.Stream`)."""
  return pipeline.Mixture({name: pipeline.Stream(
      source, transform, global_batch=global_batch, seed=seed, num_epochs=num_epochs,
      on_bad_example=on_bad_example, name=name, pad_final_batch=pad_final_batch)},
      workers=workers, read_threads=read_threads)


def field_overrides(fields: Mapping[str, str] | None, defaults: Mapping[str, str]) -> dict:
  """Where a task's inputs live in an example: `defaults`, overridden by `fields`."""
  return {**defaults, **dict(fields or {})}
