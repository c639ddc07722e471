"""Per-example image preprocessing of BEiT-3 on the host (NumPy + PIL).

Every random op takes a `np.random.Generator` first and is deterministic given it, so a grain
`RandomMapTransform` (or any loop with a per-example generator) can drive it. Images are uint8
(H, W, 3) RGB arrays throughout; ops that resample also accept a `PIL.Image.Image` in RGB mode.

Recipes (from unilm, github.com/microsoft/unilm: beit2/datasets.py and
run_beitv2_pretraining.py for pretraining, beit3/datasets.py for fine-tuning; colour jitter
from Table 11 of the BEiT-3 paper, arXiv 2208.10442; see docs/references.md):
  * Pretraining (BEiT v2 / BEiT-3): RandomResizedCrop(scale 0.08–1, ratio 3/4–4/3) → bicubic 224
    for the model and the SAME crop → lanczos 224 for the VQ-KD tokenizer ("second view"), one
    horizontal flip for both, colour jitter 0.4 (brightness/contrast/saturation).
  * VL fine-tuning: RandomResizedCrop(scale 0.5–1, bicubic) + flip; eval `eval_resize` (S, S)
    bicubic without crop; mean = std = 0.5.
  * ImageNet: ImageNet mean/std; eval `resize_shorter_center_crop` (shorter side to
    int(S / crop_pct), then centre crop S).

Fast path (measured with benchmarks/input_pipeline.py, see benchmarks/README.md): keep the host
output uint8, ship it to the device and call `normalize` / `tokenizer_view` there (under jit, on
the device batch). That is 4x less host memory traffic than float32 and, together with using one
resize per view, about 2x the host throughput. Both functions also work on host NumPy batches.
On the host, feed `augment` the PIL image from `decode_pil` rather than the array from `decode`:
the image -> array copy of the full-size image costs 0.2-1 ms at 500 x 375, while the 224 px
views are cheap to convert.

Device-side augmentation: `augment_for_device` makes one view, the tokenizer's when there is
one (decoding large JPEG crops at a reduced DCT scale), and draws the flip and colour-jitter
parameters; `beit3_jax.data.device_augment.finish_images` flips, jitters and derives the model's
view on the device. The functions here remain the reference implementation.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

BEIT3_MEAN = (0.5, 0.5, 0.5)
BEIT3_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLING = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
}
# ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

ImageLike = np.ndarray | Image.Image
# A colour-jitter draw: the ops to apply, in order, each with its factor.
JitterParams = tuple[tuple[str, float], ...]


class CorruptImageError(ValueError):
  """The bytes could not be decoded as an image (the pipeline skips and counts these)."""


# ----------------------------------------------------------------------------------------------
# Decoding and resampling helpers.


def decode_pil(data: bytes) -> Image.Image:
  """Decodes any PIL-readable image to a loaded RGB PIL image (the fast path, see `decode`).

  Args:
    data: the encoded file contents.

  Returns:
    An RGB `PIL.Image.Image`, fully decoded.

  Raises:
    TypeError: `data` is not bytes-like.
    CorruptImageError: the bytes are not a readable image (unknown format, truncated, or a
      decompression bomb).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f'decode expects bytes, got {type(data).__name__}')
  try:
    with Image.open(io.BytesIO(data)) as im:
      rgb = im.convert('RGB')  # Forces the full decode, so truncation is caught here.
      rgb.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f'cannot decode image ({len(data)} bytes): {e}') from e
  return rgb


def decode(data: bytes) -> np.ndarray:
  """Decodes any PIL-readable image (JPEG, PNG, GIF, WebP, ...) to an RGB array.

  Grayscale, palette, CMYK and RGBA inputs are converted with PIL's `convert('RGB')` (alpha is
  dropped, as in the reference's `pil_loader`). EXIF orientation is not applied (neither does
  the reference). GIFs give their first frame.

  Speed: the PIL -> NumPy copy of a 500 x 375 image cost 0.2-1 ms on our VM (Pillow 13; the
  high end when each fresh 0.5 MB buffer is mmap'ed and page-faulted, see glibc's
  MALLOC_MMAP_THRESHOLD_), up to half the JPEG decode. When the image only goes on to
  `augment` or another resampling op, use `decode_pil` and pass the PIL image instead.

  Args:
    data: the encoded file contents.

  Returns:
    uint8 (H, W, 3) RGB array (writable).

  Raises:
    TypeError: `data` is not bytes-like.
    CorruptImageError: the bytes are not a readable image.
  """
  return np.array(decode_pil(data))


def _resampling(name: str) -> Image.Resampling:
  try:
    return _RESAMPLING[name]
  except KeyError:
    raise ValueError(f'unknown interpolation {name!r}; expected one of {sorted(_RESAMPLING)}') \
        from None


def _to_pil(image: ImageLike) -> Image.Image:
  """A uint8 (H, W, 3) array or an RGB PIL image, as a PIL image (no copy for PIL input)."""
  if isinstance(image, Image.Image):
    if image.mode != 'RGB':
      raise ValueError(f'expected an RGB PIL image, got mode {image.mode!r}')
    return image
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}')
  return Image.fromarray(image)


def _resize_box(im: Image.Image, size: int, box: tuple[int, int, int, int],
                interpolation: str) -> np.ndarray:
  """Resizes the region `box` = (top, left, h, w) of `im` to (size, size); uint8 (size, size, 3).

  PIL resamples straight from the box (antialiased when shrinking), so no crop copy is made.
  """
  top, left, h, w = box
  if (top, left, h, w) == (0, 0, im.height, im.width) and (h, w) == (size, size):
    return np.array(im)
  out = im.resize((size, size), _resampling(interpolation), box=(left, top, left + w, top + h))
  return np.array(out)  # Writable, unlike np.asarray of a PIL image.


def _check_size(size: int, name: str = 'size') -> None:
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f'{name} must be a positive int, got {size!r}')


# ----------------------------------------------------------------------------------------------
# Geometric ops.


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)
                               ) -> tuple[int, int, int, int]:
  """Samples a crop box with torchvision's `RandomResizedCrop.get_params` semantics.

  Up to 10 attempts: area fraction ~ U(scale), aspect w/h ~ exp(U(log ratio)); w and h are the
  rounded sides; the first box that fits gets a uniform top-left corner. If none fits, the
  central crop of the whole image, clamped to the ratio range, is returned.

  Args:
    rng: random generator.
    height: image height in pixels.
    width: image width in pixels.
    scale: (min, max) fraction of the image area, 0 < min <= max.
    ratio: (min, max) aspect ratio width / height, 0 < min <= max.

  Returns:
    (top, left, h, w) in pixels, with 0 < h <= height and 0 < w <= width.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f'image must be non-empty, got {height}x{width}')
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f'scale must satisfy 0 < min <= max, got {tuple(scale)}')
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'ratio must satisfy 0 < min <= max, got {tuple(ratio)}')
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: central crop, clamped to the ratio range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, min(height, int(round(width / ratio[0])))
  elif in_ratio > ratio[1]:
    h, w = height, min(width, int(round(height * ratio[1])))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(rng: np.random.Generator, image: ImageLike, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = 'bicubic') -> np.ndarray:
  """RandomResizedCrop: a `random_resized_crop_params` box resized to (size, size).

  Args:
    rng: random generator.
    image: uint8 (H, W, 3) array or RGB PIL image.
    size: output side in pixels.
    scale: area fraction range, see `random_resized_crop_params`.
    ratio: aspect ratio range (w / h).
    interpolation: 'bicubic', 'bilinear', 'lanczos', 'nearest', 'box' or 'hamming'.

  Returns:
    uint8 (size, size, 3).
  """
  _check_size(size)
  im = _to_pil(image)
  box = random_resized_crop_params(rng, im.height, im.width, scale, ratio)
  return _resize_box(im, size, box, interpolation)


def horizontal_flip(rng: np.random.Generator, image: np.ndarray, prob: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability `prob` (one uniform draw, whatever `prob` is).

  Args:
    rng: random generator.
    image: (H, W, C) array.
    prob: flip probability in [0, 1].

  Returns:
    The image, flipped or not (a contiguous array of the same dtype and shape).
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f'flip prob must be in [0, 1], got {prob}')
  image = np.asarray(image)
  if rng.random() < prob:
    return np.ascontiguousarray(image[:, ::-1])
  return image


def two_view_crop(rng: np.random.Generator, image: ImageLike, size: int, second_size: int,
                  scale: Sequence[float] = (0.08, 1.0),
                  ratio: Sequence[float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                  interpolation: str = 'bicubic',
                  second_interpolation: str = 'lanczos') -> tuple[np.ndarray, np.ndarray]:
  """BEiT v2's `RandomResizedCropAndInterpolationWithTwoPic` plus the shared horizontal flip.

  One crop box and one flip decision are drawn and applied to both views; the views differ only
  in output size and interpolation. (The reference flips the full image before cropping; since
  the crop distribution is mirror-symmetric, flipping after the crop is the same in law.)

  Args:
    rng: random generator (draws: crop box, then flip).
    image: uint8 (H, W, 3) array or RGB PIL image.
    size: side of the model view in pixels.
    second_size: side of the tokenizer view in pixels.
    scale: area fraction range.
    ratio: aspect ratio range (w / h).
    flip_prob: probability of mirroring both views.
    interpolation: resampling of the model view.
    second_interpolation: resampling of the tokenizer view (beit2 default 'lanczos').

  Returns:
    (view uint8 (size, size, 3), tokenizer_view uint8 (second_size, second_size, 3)).
  """
  _check_size(size)
  _check_size(second_size, 'second_size')
  if not 0.0 <= flip_prob <= 1.0:
    raise ValueError(f'flip prob must be in [0, 1], got {flip_prob}')
  im = _to_pil(image)
  box = random_resized_crop_params(rng, im.height, im.width, scale, ratio)
  view = _resize_box(im, size, box, interpolation)
  if (second_size, second_interpolation) == (size, interpolation):
    second = view.copy()  # The same pixels: resample once.
  else:
    second = _resize_box(im, second_size, box, second_interpolation)
  if rng.random() < flip_prob:
    view = np.ascontiguousarray(view[:, ::-1])
    second = np.ascontiguousarray(second[:, ::-1])
  return view, second


def eval_resize(image: ImageLike, size: int, interpolation: str = 'bicubic') -> np.ndarray:
  """Plain resize to (size, size) without cropping (the VL tasks' eval transform).

  Args:
    image: uint8 (H, W, 3) array or RGB PIL image.
    size: output side in pixels.
    interpolation: resampling name.

  Returns:
    uint8 (size, size, 3); the input's pixels unchanged when it already has that size.
  """
  _check_size(size)
  im = _to_pil(image)
  return _resize_box(im, size, (0, 0, im.height, im.width), interpolation)


def eval_view(image: ImageLike, size: int, crop_pct: float = 0.0,
              interpolation: str = 'bicubic') -> np.ndarray:
  """uint8 (size, size, 3): `eval_resize` when crop_pct is 0, else
  `resize_shorter_center_crop` with it."""
  if crop_pct == 0:
    return eval_resize(image, size, interpolation)
  return resize_shorter_center_crop(image, size, crop_pct, interpolation)


def resize_shorter_center_crop(image: ImageLike, size: int, crop_pct: float = 1.0,
                               interpolation: str = 'bicubic') -> np.ndarray:
  """ImageNet eval: Resize(int(size / crop_pct)) on the shorter side, then CenterCrop(size).

  Follows torchvision: the longer side becomes int(short_target * long / short); the crop's
  top-left is round((H' - size) / 2), round((W' - size) / 2).

  Args:
    image: uint8 (H, W, 3) array or RGB PIL image.
    size: output side in pixels.
    crop_pct: fraction of the resized shorter side kept, in (0, 1].
    interpolation: resampling name.

  Returns:
    uint8 (size, size, 3).
  """
  _check_size(size)
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
  im = _to_pil(image)
  h, w = im.height, im.width
  short = int(size / crop_pct)
  if h <= w:
    new_h, new_w = short, int(short * w / h)
  else:
    new_h, new_w = int(short * h / w), short
  if (new_h, new_w) != (h, w):
    im = im.resize((new_w, new_h), _resampling(interpolation))
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return np.array(im)[top:top + size, left:left + size]


# ----------------------------------------------------------------------------------------------
# Colour jitter.


def _factor_range(value: float | Sequence[float], name: str) -> tuple[float, float] | None:
  """torchvision's range for a jitter strength: [max(0, 1 - x), 1 + x]; None when x == 0."""
  if isinstance(value, (int, float)):
    if value < 0:
      raise ValueError(f'{name} must be >= 0, got {value}')
    lo, hi = max(0.0, 1.0 - value), 1.0 + value
  else:
    lo, hi = float(value[0]), float(value[1])
    if not 0.0 <= lo <= hi:
      raise ValueError(f'{name} range must satisfy 0 <= min <= max, got {tuple(value)}')
  return None if lo == hi == 1.0 else (lo, hi)


def color_jitter_params(rng: np.random.Generator, brightness: float | Sequence[float] = 0.4,
                        contrast: float | Sequence[float] = 0.4,
                        saturation: float | Sequence[float] = 0.4,
                        hue: float = 0.0) -> JitterParams:
  """Draws torchvision `ColorJitter.get_params`: a random op order, then one factor per op.

  Args:
    rng: random generator (draws: a permutation of the 4 ops, then the factors of the enabled
      ops in the fixed order brightness, contrast, saturation, hue).
    brightness: strength x (factor ~ U[max(0, 1 - x), 1 + x]) or an explicit (min, max).
    contrast: as brightness.
    saturation: as brightness.
    hue: strength in [0, 0.5]; the hue shift ~ U[-hue, hue] in turns of the colour wheel.

  Returns:
    The enabled ops in application order, as (name, factor) pairs; empty if all are off.
  """
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f'hue must be in [0, 0.5], got {hue}')
  ranges = {'brightness': _factor_range(brightness, 'brightness'),
            'contrast': _factor_range(contrast, 'contrast'),
            'saturation': _factor_range(saturation, 'saturation'),
            'hue': (-hue, hue) if hue > 0 else None}
  names = list(ranges)
  order = rng.permutation(len(names))
  factors = {n: float(rng.uniform(*r)) for n, r in ranges.items() if r is not None}
  return tuple((names[i], factors[names[i]]) for i in order if names[i] in factors)


def _shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
  """torchvision's PIL hue path on float (pixels, 3) in [0, 255]: uint8 HSV, H += shift * 255.

  The shift is truncated toward zero and wraps modulo 256, as in torchvision.
  """
  im = Image.fromarray((x + 0.5).astype(np.uint8)[:, None, :])  # A (pixels, 1) RGB image.
  hsv = np.array(im.convert('HSV'))
  hsv[..., 0] += np.array(shift * 255).astype(np.int64).astype(np.uint8)
  rgb = np.asarray(Image.fromarray(hsv, 'HSV').convert('RGB'))
  return rgb.reshape(-1, 3).astype(np.float32)


def apply_color_jitter(images: Sequence[np.ndarray], params: JitterParams) -> list[np.ndarray]:
  """Applies one colour-jitter draw identically to several views of the same crop.

  Each op works in float32 and clips to [0, 255] (as torchvision does; a clip is skipped only
  where the op cannot leave the range, i.e. factor <= 1); the result is rounded to uint8 once at
  the end. brightness: x * f. contrast: f * x + (1 - f) * mean(gray). saturation:
  f * x + (1 - f) * gray, gray = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2 luma). hue: shift H in
  PIL's uint8 HSV (the only op that rounds to uint8 in between). The contrast mean is that of
  the FIRST image at that point of the chain and is used for all of them, so every view gets the
  same per-pixel colour map, as if the jitter had run once before the views were resized.

  Args:
    images: uint8 (H_i, W_i, 3) arrays (sizes may differ).
    params: from `color_jitter_params`.

  Returns:
    uint8 arrays, one per input, same shapes. Inputs are returned as-is if `params` is empty.
  """
  if not params:
    return list(images)
  sizes = []
  for image in images:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected uint8 (H, W, 3) images, got {image.dtype} {image.shape}')
    sizes.append(image.shape[0] * image.shape[1])
  # All views in one flat float32 (pixels, 3) buffer: one pass per op instead of one per view.
  x = np.empty((sum(sizes), 3), np.float32)
  ends = np.cumsum(sizes)
  for image, end, n in zip(images, ends, sizes):
    x[end - n:end] = image.reshape(n, 3)
  for name, f in params:
    if name == 'brightness':
      x *= f
      if f > 1:
        np.minimum(x, 255.0, out=x)
    elif name == 'contrast':
      mean = float(np.mean(x[:sizes[0]] @ _LUMA))
      x *= f
      x += (1.0 - f) * mean
      if f > 1:
        np.clip(x, 0.0, 255.0, out=x)
    elif name == 'saturation':
      gray = x @ _LUMA
      gray *= 1.0 - f
      x *= f
      x += gray[:, None]
      if f > 1:
        np.clip(x, 0.0, 255.0, out=x)
    elif name == 'hue':
      x = _shift_hue(x, f)
    else:
      raise ValueError(f'unknown colour-jitter op {name!r}')
  x += 0.5
  out = x.astype(np.uint8)
  return [out[end - n:end].reshape(image.shape) for image, end, n in zip(images, ends, sizes)]


def color_jitter(rng: np.random.Generator, image: np.ndarray,
                 brightness: float | Sequence[float] = 0.4,
                 contrast: float | Sequence[float] = 0.4,
                 saturation: float | Sequence[float] = 0.4, hue: float = 0.0) -> np.ndarray:
  """torchvision-like ColorJitter on one image (see `color_jitter_params`, `apply_color_jitter`).

  Args:
    rng: random generator.
    image: uint8 (H, W, 3).
    brightness: strength or (min, max) factor range; 0 disables.
    contrast: as brightness.
    saturation: as brightness.
    hue: strength in [0, 0.5]; 0 disables (implemented through PIL's HSV conversion).

  Returns:
    uint8 (H, W, 3).
  """
  params = color_jitter_params(rng, brightness, contrast, saturation, hue)
  return apply_color_jitter([np.asarray(image)], params)[0]


# ----------------------------------------------------------------------------------------------
# Normalisation (host NumPy or device jax.numpy).


def _check_uint8_rgb(images: Any, channels: int) -> None:
  if images.dtype != np.uint8:
    raise TypeError(f'expected uint8 images, got {images.dtype}')
  if images.shape[-1] != channels:
    raise ValueError(f'expected {channels} channels last, got shape {images.shape}')


def normalize(images: Any, mean: Sequence[float] = BEIT3_MEAN,
              std: Sequence[float] = BEIT3_STD) -> Any:
  """(x / 255 - mean) / std in float32, for a np.ndarray or a jax.Array (also under jit).

  Written with plain arithmetic (`astype`, `*`, `-` with NumPy constants on the right), so a
  NumPy input gives a NumPy result and a jax input a jax result. Fast path: ship the uint8
  batch to the device and call this there.

  Args:
    images: uint8 (..., H, W, C) with C == len(mean).
    mean: per-channel mean in [0, 1] units (BEIT3_MEAN or IMAGENET_MEAN).
    std: per-channel std in [0, 1] units.

  Returns:
    float32 (..., H, W, C).
  """
  _check_uint8_rgb(images, len(mean))
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  if mean.shape != std.shape or np.any(std <= 0):
    raise ValueError(f'bad mean/std: {mean}, {std}')
  # A subtraction and a division (not a fused multiply-add) keep 0.5/0.5 exact: 0 -> -1, 255 -> 1.
  return ((images.astype(np.float32) - (255.0 * mean).astype(np.float32))
          / (255.0 * std).astype(np.float32))


def tokenizer_view(images: Any) -> Any:
  """The VQ-KD tokenizer input: x / 255 * 2 - 1 in float32, exactly within [-1, 1] (np or jax).

  Args:
    images: uint8 (..., H, W, 3).

  Returns:
    float32 (..., H, W, 3).
  """
  _check_uint8_rgb(images, 3)
  return (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)  # Exact at 0, 255.


# ----------------------------------------------------------------------------------------------
# The composed training augmentation.


@dataclasses.dataclass(frozen=True)
class ImageAugConfig:
  """Training augmentation of one image.

  The defaults are the BEiT v2 / BEiT-3 pretraining recipe: crop scale 0.08–1
  (`--min_crop_scale`), flip 0.5, colour jitter 0.4, bicubic 224 for the model and a lanczos 224
  tokenizer view. The VL fine-tuning recipe is
  `ImageAugConfig(size=S, scale=(0.5, 1.0), color_jitter=0.0, second_size=None)`.

  Attributes:
    size: model view side in pixels.
    scale: RandomResizedCrop area fraction range.
    ratio: RandomResizedCrop aspect ratio range (w / h).
    flip_prob: horizontal flip probability (shared by both views).
    color_jitter: brightness = contrast = saturation strength (hue off); 0 disables.
    interpolation: resampling of the model view.
    second_size: tokenizer view side in pixels, or None for no tokenizer view.
    second_interpolation: resampling of the tokenizer view.
  """
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  color_jitter: float = 0.4
  interpolation: str = 'bicubic'
  second_size: int | None = 224
  second_interpolation: str = 'lanczos'

  def __post_init__(self):
    _check_size(self.size)
    if self.second_size is not None:
      _check_size(self.second_size, 'second_size')
    _resampling(self.interpolation)
    _resampling(self.second_interpolation)
    if not 0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f'scale must satisfy 0 < min <= max, got {self.scale}')
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f'ratio must satisfy 0 < min <= max, got {self.ratio}')
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f'flip_prob must be in [0, 1], got {self.flip_prob}')
    if self.color_jitter < 0:
      raise ValueError(f'color_jitter must be >= 0, got {self.color_jitter}')


def augment(rng: np.random.Generator, image: ImageLike,
            cfg: ImageAugConfig) -> dict[str, np.ndarray | None]:
  """Random-resized crop (+ tokenizer view of the same crop) → shared flip → shared colour jitter.

  Differs from beit2's order (jitter on the full image, then flip, then crop) in one respect:
  the jitter runs on the resized views, which is much cheaper. Brightness and saturation are
  per-pixel linear maps, so they commute with resampling up to clipping and rounding; the
  contrast mean is that of the crop rather than of the whole image.

  Args:
    rng: random generator (draws: crop box, flip, jitter order, jitter factors).
    image: uint8 (H, W, 3) array or RGB PIL image (`decode_pil` output is the fast path).
    cfg: the augmentation settings.

  Returns:
    {'image': uint8 (size, size, 3), 'tokenizer_image': uint8 (second_size, second_size, 3) or
    None when cfg.second_size is None}.
  """
  if cfg.second_size is None:
    im = _to_pil(image)
    box = random_resized_crop_params(rng, im.height, im.width, cfg.scale, cfg.ratio)
    views = [horizontal_flip(rng, _resize_box(im, cfg.size, box, cfg.interpolation),
                             cfg.flip_prob)]
  else:
    views = list(two_view_crop(rng, image, cfg.size, cfg.second_size, cfg.scale, cfg.ratio,
                               cfg.flip_prob, cfg.interpolation, cfg.second_interpolation))
  if cfg.color_jitter > 0:
    s = cfg.color_jitter
    params = color_jitter_params(rng, s, s, s, 0.0)
    if len(views) == 2 and (cfg.second_size, cfg.second_interpolation) == (cfg.size,
                                                                          cfg.interpolation):
      views = apply_color_jitter(views[:1], params)  # Identical views: jitter once.
      views.append(views[0].copy())
    else:
      views = apply_color_jitter(views, params)
  return {'image': views[0], 'tokenizer_image': views[1] if len(views) > 1 else None}


# ----------------------------------------------------------------------------------------------
# The host half of the device-side augmentation (see beit3_jax/data/device_augment.py).

# Op ids of the device colour jitter: index into its factors, entries of its order.
JITTER_OPS = ('brightness', 'contrast', 'saturation')
# PIL's JPEG draft offers DCT scalings of 1/2, 1/4 and 1/8.
_MAX_DRAFT_REDUCTION = 8


def encode_jitter(params: JitterParams) -> tuple[np.ndarray, np.ndarray]:
  """Encodes a colour-jitter draw as fixed-shape arrays for `device_augment.apply_color_jitter`.

  Args:
    params: from `color_jitter_params` with hue off; may be empty or hold a subset of the ops.

  Returns:
    (factors, order): factors float32 (3,) indexed by op id (0 brightness, 1 contrast,
    2 saturation; 1.0 for an op not in `params`); order int32 (3,), the op ids in application
    order: those in `params` first, then the absent ones (identities) in id order. Empty
    `params` give ([1, 1, 1], [0, 1, 2]).

  Raises:
    ValueError: `params` holds 'hue' (not supported on the device), an unknown or a repeated op.
  """
  factors = np.ones(len(JITTER_OPS), np.float32)
  order: list[int] = []
  for name, f in params:
    if name not in JITTER_OPS:
      raise ValueError(f'cannot encode colour-jitter op {name!r} for the device; '
                       f'expected one of {JITTER_OPS}')
    i = JITTER_OPS.index(name)
    if i in order:
      raise ValueError(f'colour-jitter op {name!r} appears twice in {params}')
    factors[i] = f
    order.append(i)
  order += [i for i in range(len(JITTER_OPS)) if i not in order]
  return factors, np.array(order, np.int32)


def _draft_reduction(crop_h: int, crop_w: int, size: int) -> int:
  """The largest r in {1, 2, 4, 8} with crop_h / r >= size and crop_w / r >= size."""
  r = 1
  while r < _MAX_DRAFT_REDUCTION and min(crop_h, crop_w) >= 2 * r * size:
    r *= 2
  return r


def host_view(cfg: ImageAugConfig) -> tuple[int, str]:
  """(side, interpolation) of the one view `augment_for_device` makes: the tokenizer view's
  when cfg has one (the visual tokens, the masked-image-modelling targets, are then computed
  from exactly the reference's pixels), else the model view's."""
  if cfg.second_size is not None:
    return cfg.second_size, cfg.second_interpolation
  return cfg.size, cfg.interpolation


def _decode_crop(rng: np.random.Generator, data: bytes,
                 cfg: ImageAugConfig) -> tuple[np.ndarray, int]:
  """Decodes `data`, draws a crop box on its full size and resizes the crop to the host view
  (`host_view`: the tokenizer's size and interpolation when there is a tokenizer view).

  The box is drawn from the header's size before any pixel is decoded, so a JPEG can be decoded
  at a reduced DCT scale when the crop is large (see `augment_for_device`).

  Args:
    rng: random generator (draws: the crop box only).
    data: the encoded file contents.
    cfg: the augmentation settings.

  Returns:
    (view uint8 (V, V, 3) with V the host view's side, not flipped; the decode's reduction
    factor r, 1 for a full decode, else 2, 4 or 8).

  Raises:
    TypeError: `data` is not bytes-like.
    CorruptImageError: the bytes are not a readable image.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f'decode expects bytes, got {type(data).__name__}')
  side, interpolation = host_view(cfg)
  try:
    im = Image.open(io.BytesIO(data))  # Reads the header only.
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f'cannot decode image ({len(data)} bytes): {e}') from e
  with im:
    full_w = im.width
    top, left, h, w = random_resized_crop_params(rng, im.height, im.width, cfg.scale, cfg.ratio)
    reduction = _draft_reduction(h, w, side) if im.format == 'JPEG' else 1
    try:
      if reduction > 1:
        # PIL picks the largest scale s in {8, 4, 2, 1} with s <= min(W // req_w, H // req_h);
        # with req = (W // r, H // r) that is r. It returns the full image's size in the reduced
        # pixels, from which the scale actually set is read back.
        drafted = im.draft('RGB', (im.width // reduction, im.height // reduction))
        reduction = 1 if drafted is None else int(round(full_w / drafted[1][2]))
      im.load()  # Forces the full decode, so truncation is caught here.
      rgb = im if im.mode == 'RGB' else im.convert('RGB')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise CorruptImageError(f'cannot decode image ({len(data)} bytes): {e}') from e
    if reduction == 1:
      return _resize_box(rgb, side, (top, left, h, w), interpolation), 1
    # Reduced pixel j covers full-size pixels [j r, (j + 1) r): the box scales by 1 / r.
    r = float(reduction)
    out = rgb.resize((side, side), _resampling(interpolation),
                     box=(left / r, top / r, (left + w) / r, (top + h) / r))
    return np.array(out), reduction


def augment_for_device(rng: np.random.Generator, image: bytes | ImageLike,
                       cfg: ImageAugConfig) -> dict[str, np.ndarray]:
  """The host half of `augment` when colour jitter and the tokenizer view run on the device.

  Produces one view of the crop and the drawn flip and jitter parameters. The view is the
  tokenizer's (cfg.second_interpolation at cfg.second_size) when cfg has a tokenizer view, else
  the model's (cfg.interpolation at cfg.size), see `host_view`; `device_augment.finish_images`
  flips and jitters it inside the jitted step and derives the model view from the jittered view
  (the same pixels at equal sizes, else a bicubic resize). So the visual tokens are computed
  from the reference's tokenizer pixels, and the model sees a lanczos rather than a bicubic
  resample at equal sizes. The random draws are those of `augment` in the same order (crop box,
  flip, jitter order, jitter factors), so for the same generator state the box, flip and jitter
  equal `augment`'s, and 'image' equals `augment`'s corresponding view with color_jitter=0 (bit
  for bit, except when the JPEG draft below applies).

  JPEG draft decoding (encoded JPEG bytes only): the crop box is drawn from the header's size,
  and when the crop is at least 2 x the view's side V on both sides the JPEG is decoded at a
  reduced DCT scale 1/r (r = 2, 4 or 8, the largest that keeps the reduced crop >= V on both
  sides), which makes the decode and the resize several times cheaper for large photos. The reduced
  decode averages r x r blocks in the DCT domain, so the view differs slightly from a full
  decode followed by the antialiased resize (tests/test_device_augment.py measures the mean
  absolute difference). Smaller crops and other formats decode fully.

  Args:
    rng: random generator.
    image: encoded bytes (any PIL-readable format), a uint8 (H, W, 3) array or an RGB PIL image.
    cfg: the augmentation settings.

  Returns:
    {'image': uint8 (V, V, 3), V = `host_view(cfg)[0]`, not flipped; 'flip': bool, mirror it
    left-right; 'jitter': float32 (3,) factors by op id
    (brightness, contrast, saturation; 1.0 for an op that is off); 'jitter_order': int32 (3,) op
    ids in application order ([0, 1, 2] when jitter is off)}, see `encode_jitter`.

  Raises:
    CorruptImageError: `image` is bytes that cannot be decoded.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    view, _ = _decode_crop(rng, image, cfg)
  else:
    im = _to_pil(image)
    box = random_resized_crop_params(rng, im.height, im.width, cfg.scale, cfg.ratio)
    side, interpolation = host_view(cfg)
    view = _resize_box(im, side, box, interpolation)
  flip = rng.random() < cfg.flip_prob   # applied on the device: a host copy costs 0.1 ms
  params: JitterParams = ()
  if cfg.color_jitter > 0:
    s = cfg.color_jitter
    params = color_jitter_params(rng, s, s, s, 0.0)
  factors, order = encode_jitter(params)
  return {'image': view, 'flip': np.bool_(flip), 'jitter': factors, 'jitter_order': order}


def finish_on_host(views: dict[str, np.ndarray]) -> np.ndarray:
  """The flip `augment_for_device` leaves to the device, done here (for tests and tools):
  uint8 (V, V, 3) as `augment` would have flipped it (no jitter)."""
  return np.ascontiguousarray(views['image'][:, ::-1]) if views['flip'] else views['image']
