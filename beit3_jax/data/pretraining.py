"""The pretraining inputs of BEiT-3: the 'image', 'text' and 'pair' streams of one mixture.

Per example (see `beit3_jax.data.schema` for the batch layout):

- image: decode (JPEG draft-scaled when the crop is at least twice the view) -> random resized
  crop -> ONE view, the visual tokenizer's (lanczos, `tokenizer_image_size`) -> flip; the colour
  jitter is drawn here and applied on the device, where the model's view is derived from the
  jittered view (the same pixels at equal sizes, else bicubic; `device_augment.finish_images`
  in the jitted step) -> block-wise mask of `image_mask_ratio` of the patches (host NumPy,
  0.055 ms an image at 14 x 14, about 3% of an image's host time: it stays on the host). A pair
  stream without masked image modelling has no visual tokens: its one view is the model's
  (bicubic, `image_size`). `PretrainInputs(views_on_device=False)` keeps the host reference instead:
  both views (bicubic and lanczos) and the jitter computed here (`image_ops.augment`).
- text: `<s>` pieces `</s>` padded to `text_len` -> `text_mask_ratio` (15%) of the real tokens
  masked, 80% [MASK] / 10% random / 10% unchanged.
- pair: an image as above and one of its captions (chosen by the example's rng) with
  `pair_text_mask_ratio` (50%) of its tokens masked; its patches are masked only if
  `pair_image_mask_ratio` > 0 (the paper does not say; default 0, documented in the config).

Examples come from random-access TFDS sources (`tfds_sources.open_source`). Images may be
decoded arrays (feature `image`, as the built-in data set stores them) or encoded bytes
(`image_bytes`, as the local-file builders do); undecodable images and empty texts are skipped
and counted, never a crash.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from beit3_jax.data import image_ops, masking, pipeline
from beit3_jax.data.text import TextTokenizer

# First id of an ordinary piece in the XLM-R layout (<s>, <pad>, </s>, <unk> come first).
FIRST_PIECE_ID = 4


@dataclasses.dataclass(frozen=True)
class PretrainInputs:
  """Everything the three streams need to know.

  Attributes:
    image_size: model view side (px).
    tokenizer_image_size: side of the visual tokenizer's view (px).
    patch_size: the model's patch size (px); the mask grid is image_size // patch_size.
    text_len: tokens per text, with <s> and </s>.
    image_mask: block-wise masking of image-stream patches (ratio 0.4 in the paper).
    pair_image_mask_ratio: share of pair-stream patches masked (0 = none).
    text_mask_ratio: share of text-stream tokens masked (0.15 in the paper).
    pair_text_mask_ratio: share of pair-stream text tokens masked (0.5 in the paper).
    crop_scale: RandomResizedCrop area range (0.08-1 as BEiT v2's --min_crop_scale).
    color_jitter: brightness/contrast/saturation strength (0.4 in the paper).
    second_interpolation: resampling of the tokenizer view on the host (BEiT v2: lanczos;
      the device derives it with lanczos3 from the bicubic view).
    views_on_device: True (the fast path) or False (the host reference, see above).
  The derived `augment` property is the `image_ops.ImageAugConfig` of the image streams.
  """
  image_size: int
  tokenizer_image_size: int
  patch_size: int
  text_len: int
  image_mask: masking.BlockMaskConfig = masking.BlockMaskConfig()
  pair_image_mask_ratio: float = 0.0
  text_mask_ratio: float = 0.15
  pair_text_mask_ratio: float = 0.5
  crop_scale: tuple[float, float] = (0.08, 1.0)
  color_jitter: float = 0.4
  second_interpolation: str = 'lanczos'
  views_on_device: bool = True

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not a multiple of '
                       f'patch_size={self.patch_size}.')

  @property
  def grid(self) -> tuple[int, int]:
    g = self.image_size // self.patch_size
    return (g, g)

  @property
  def augment(self) -> image_ops.ImageAugConfig:
    return image_ops.ImageAugConfig(
        size=self.image_size, scale=tuple(self.crop_scale), color_jitter=self.color_jitter,
        second_size=self.tokenizer_image_size, second_interpolation=self.second_interpolation)


# Where the streams find their inputs in an example; '/' walks into nested features, e.g.
# 'captions/text' for TFDS coco_captions. Override per source with `make_mixture(fields=...)`.
DEFAULT_FIELDS = {'image': 'image', 'caption': 'captions', 'text': 'text'}


def get_field(example: Mapping[str, Any], path: str):
  """example['a']['b'] for path 'a/b'; KeyError naming the path and the keys there."""
  node = example
  for key in path.split('/'):
    if not isinstance(node, Mapping) or key not in node:
      keys = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise KeyError(f'Example has no field {path!r} (at {key!r}: {keys}); set the stream\'s '
                     'fields to the names this data set uses.')
    node = node[key]
  return node


def encoded_image(example: Mapping[str, Any], field: str):
  """The example's encoded image bytes (`image_bytes` first, else `field` when it holds bytes),
  or None when it holds a decoded array."""
  if 'image_bytes' in example:
    return example['image_bytes']
  image = get_field(example, field)
  return image if isinstance(image, (bytes, bytearray)) else None


def load_image(example: Mapping[str, Any], field: str):
  """The example's image as uint8 (H, W, 3) / PIL image, or a Skip.

  Encoded bytes (`image_bytes`, the local-file builders) take precedence over `field`.
  """
  encoded = encoded_image(example, field)
  if encoded is not None:
    try:
      return image_ops.decode_pil(encoded)
    except image_ops.CorruptImageError:
      return pipeline.Skip('corrupt image')
  image = np.asarray(get_field(example, field))
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)  # grayscale data sets
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    return pipeline.Skip('bad image array')
  return image


def _as_str(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _masked_text(tokenizer: TextTokenizer, text: str, text_len: int, ratio: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  ids, pad = tokenizer.encode_sequence(text, text_len)
  inputs, targets, positions = masking.mask_text(
      rng, ids, pad, ratio, tokenizer.mask_id, tokenizer.special_ids,
      FIRST_PIECE_ID, tokenizer.mask_id)
  return {'text_ids': inputs.astype(np.int32), 'text_padding_mask': pad,
          'text_targets': targets.astype(np.int32), 'text_mask': positions}


def _augmented_image(cfg: PretrainInputs, example, mask_ratio: float, rng, field: str):
  if cfg.views_on_device:
    # Bytes go in undecoded: the crop box decides how far the JPEG decode can be scaled down.
    image = encoded_image(example, field)
    if image is None:
      image = load_image(example, field)
      if isinstance(image, pipeline.Skip):
        return image
    aug = cfg.augment
    if mask_ratio == 0:   # no visual tokens for this stream: the host view is the model's
      aug = dataclasses.replace(aug, second_size=None)
    try:
      views = image_ops.augment_for_device(rng, image, aug)
    except image_ops.CorruptImageError:
      return pipeline.Skip('corrupt image')
  else:
    image = load_image(example, field)
    if isinstance(image, pipeline.Skip):
      return image
    views = image_ops.augment(rng, image, cfg.augment)
  n = cfg.grid[0] * cfg.grid[1]
  mask_cfg = dataclasses.replace(cfg.image_mask, ratio=mask_ratio)
  return {**views, 'image_mask': mask_cfg.sample(rng, cfg.grid) if mask_ratio > 0
                                 else np.zeros((n,), bool)}


def image_transform(cfg: PretrainInputs, image_field: str = 'image') -> pipeline.Transform:
  """(example with an image, rng) -> the 'image' stream's example."""
  def transform(example, rng):
    return _augmented_image(cfg, example, cfg.image_mask.ratio, rng, image_field)
  return transform


def text_transform(cfg: PretrainInputs, tokenizer: TextTokenizer,
                   field: str = 'text') -> pipeline.Transform:
  """(example with a text field, rng) -> the 'text' stream's example."""
  def transform(example, rng):
    text = _as_str(get_field(example, field)).strip()
    if not text:
      return pipeline.Skip('empty text')
    return _masked_text(tokenizer, text, cfg.text_len, cfg.text_mask_ratio, rng)
  return transform


def pair_transform(cfg: PretrainInputs, tokenizer: TextTokenizer, image_field: str = 'image',
                   caption_field: str = 'captions') -> pipeline.Transform:
  """(example with an image and a caption or a list of captions, rng) -> a 'pair' example.

  `caption_field` falls back to 'caption' when the example has no `caption_field` (the
  local-file builders store one caption per example).
  """
  def transform(example, rng):
    if caption_field not in example and '/' not in caption_field and 'caption' in example:
      captions = example['caption']
    else:
      captions = get_field(example, caption_field)
    if isinstance(captions, (str, bytes)):
      captions = [captions]
    captions = [c for c in (_as_str(c).strip() for c in captions) if c]
    if not captions:
      return pipeline.Skip('empty caption')
    caption = captions[int(rng.integers(len(captions)))]
    image = _augmented_image(cfg, example, cfg.pair_image_mask_ratio, rng, image_field)
    if isinstance(image, pipeline.Skip):
      return image
    return {**image, **_masked_text(tokenizer, caption, cfg.text_len,
                                    cfg.pair_text_mask_ratio, rng)}
  return transform


def make_mixture(cfg: PretrainInputs, tokenizer: TextTokenizer, sources: Mapping[str, Any],
                 batch_sizes: Mapping[str, int], seed: int, *,
                 fields: Mapping[str, Mapping[str, str]] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 read_threads: int = 2, workers: int = 0,
                 on_bad_example: str = 'skip') -> pipeline.Mixture:
  """The pretraining mixture over the streams named in `sources` ('image', 'text', 'pair').

  Args:
    cfg: the per-example settings.
    tokenizer: the text tokenizer.
    sources: stream name -> random-access source.
    batch_sizes: stream name -> global batch size (a stream with batch 0 is left out).
    seed: the data seed; each stream derives its own.
    fields: stream name -> overrides of `DEFAULT_FIELDS` for that stream's source, e.g.
      {'pair': {'caption': 'captions/text'}} for TFDS coco_captions.
    read_threads, workers: see `pipeline.Mixture`; on_bad_example: see `pipeline.Stream`.
  """
  def f(stream):
    return {**DEFAULT_FIELDS, **dict((fields or {}).get(stream, {}))}
  transforms = {'image': lambda: image_transform(cfg, f('image')['image']),
                'text': lambda: text_transform(cfg, tokenizer, f('text')['text']),
                'pair': lambda: pair_transform(cfg, tokenizer, f('pair')['image'],
                                               f('pair')['caption'])}
  unknown = set(sources) - set(transforms)
  if unknown:
    raise KeyError(f'Unknown stream(s) {sorted(unknown)}; known: {sorted(transforms)}.')
  streams = {}
  for offset, name in enumerate(('image', 'text', 'pair')):
    if name not in sources or not batch_sizes.get(name, 0):
      continue
    streams[name] = pipeline.Stream(
        sources[name], transforms[name](), global_batch=int(batch_sizes[name]),
        seed=seed * 1000 + offset, process_index=process_index, process_count=process_count,
        on_bad_example=on_bad_example, name=name)
  if not streams:
    raise ValueError('No stream has a source and a batch size > 0.')
  return pipeline.Mixture(streams, workers=workers, read_threads=read_threads)
