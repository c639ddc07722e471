"""unilm's training augmentations of BEiT-3 fine-tuning: NumPy + PIL on the host, erasing on the
device.

unilm (github.com/microsoft/unilm, beit3/datasets.py `build_transform`) augments the training
view after RandomResizedCrop + flip with one of:

  * VQA and captioning (`--randaug`, given by their get_started commands; not retrieval or
    NLVR2): `RandomAugment(2, 7, isPIL=True, augs=[...])` of beit3/randaug.py (from ALBEF), a
    NumPy / OpenCV implementation: 2 ops drawn uniformly with replacement from `UNILM_VL_OPS`,
    each applied with probability 0.5 at magnitude 7 of 10; geometric ops fill with 128 and
    flip the sign of their magnitude with probability 0.5. `RandomAugment` here gives the same
    pixels without OpenCV: `_warp_affine` follows OpenCV's fixed-point bilinear warpAffine
    (1/32 px grid, 15-bit weights) and the sharpness filter its 3 x 3 filter2D (reflect-101
    borders). Checked op by op against randaug.py under opencv-python-headless 4.8.1
    (tests/fixtures/augment_reference.npz): every op is exact.
  * ImageNet (timm 0.6.13 `create_transform(auto_augment='rand-m9-mstd0.5-inc1')`, unilm's
    `--aa` default): timm's RandAugment, PIL ops, 2 ops drawn uniformly with replacement,
    each applied with probability 0.5 at a magnitude ~ N(9, 0.5) clipped to [0, 10], the
    "increasing" op list (`TIMM_INCREASING_OPS`), fill = the dataset mean in uint8
    (round(255 * mean)), bicubic resampling. `parse_rand_augment` reads timm's config string.
    timm ignores `--color_jitter` when an auto-augment policy is set, so there is no colour
    jitter in unilm's ImageNet recipe. Pixels equal timm's (the same PIL calls).
  * ImageNet, after normalisation: timm's `RandomErasing(0.25, mode='pixel', max_count=1)`:
    with probability 0.25 a rectangle of 2% - 1/3 of the area, aspect 0.3 - 3.3 (log-uniform),
    is replaced with per-pixel N(0, 1) noise in the normalised space.

Every random draw comes from an explicit `np.random.Generator` (its bits differ from unilm's
global `np.random` / `random` / torch draws; the distributions are the same). Each op can be
applied with fixed parameters: `apply_unilm_op(image, name, *args)` with `unilm_op_args(name,
magnitude, negate)`, `apply_timm_op(image, name, *args, fill=..., interpolation=...)` with
`timm_op_args(name, magnitude, negate)`, `erase(image, boxes, values)`.

Random erasing on the device: our pipeline ships uint8 images and normalises them on the
device, so the normalised noise cannot travel in the uint8 batch. `erase_on_device` draws the
rectangles and the noise on the device, after `image_ops.normalize` and before mixup / cutmix
(timm erases in the dataset transform, before the batch is mixed), from the step's key: per
example the same distribution as timm's (apply with probability `prob`; per box up to 10
attempts of area ~ U(min_area, max_area) x H x W / count and log-aspect ~ U, the first that
fits with top / left uniform; noise N(0, 1) per pixel and channel for 'pixel', per channel for
'rand', 0 for 'const'). The batch layout is unchanged. `RandomErasing` is the host reference
of the same sampler on a float (H, W, C) image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ----------------------------------------------------------------------------------------------
# unilm's RandomAugment (beit3/randaug.py).

UNILM_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Rotate', 'Solarize', 'Color', 'Contrast',
             'Brightness', 'Sharpness', 'ShearX', 'TranslateX', 'TranslateY', 'Posterize',
             'ShearY')
# The op list of beit3/datasets.py `build_transform` (VQA, captioning with --randaug).
UNILM_VL_OPS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness', 'ShearX',
                'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
UNILM_FILL = 128              # randaug.py replace_value, every channel
UNILM_MAX_LEVEL = 10.0
UNILM_TRANSLATE_CONST = 10.0  # px at magnitude 10
_UNILM_SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
# randaug.py weighs the channels of the RGB image as if it were BGR.
_UNILM_CONTRAST_WEIGHTS = np.array([0.114, 0.587, 0.299])


def _wrap_uint8(x: np.ndarray) -> np.ndarray:
  """float -> uint8 as NumPy's unchecked cast on x86 (truncate, then keep the low 8 bits): the
  reference's sharpness blend casts without clipping."""
  return (np.trunc(x).astype(np.int64) & 255).astype(np.uint8)


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}')
  return image


def _autocontrast(img: np.ndarray) -> np.ndarray:
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    high, low = int(ch.max()), int(ch.min())
    if high <= low:
      table = np.arange(256)
    else:
      scale = 255 / (high - low)
      table = (np.arange(256) * scale - low * scale).clip(0, 255)
    out[..., c] = table.astype(np.uint8)[ch]
  return out


def _equalize(img: np.ndarray) -> np.ndarray:
  """PIL's equalize as randaug.py computes it (float32 histogram, per channel)."""
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
    nonzero = hist[hist != 0]
    step = np.sum(nonzero[:-1], dtype=np.float32) // np.float32(255)
    if step == 0:
      out[..., c] = ch
      continue
    n = np.empty_like(hist)
    n[0] = step // 2
    n[1:] = hist[:-1]
    out[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
  return out


def _solarize(img: np.ndarray, thresh: int) -> np.ndarray:
  table = np.array([v if v < thresh else 255 - v for v in range(256)]).clip(0, 255)
  return table.astype(np.uint8)[img]


def _color(img: np.ndarray, factor: float) -> np.ndarray:
  m = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]])
       * factor + np.float32([[0.114], [0.587], [0.299]]))
  return np.matmul(img, m).clip(0, 255).astype(np.uint8)


def _contrast(img: np.ndarray, factor: float) -> np.ndarray:
  mean = np.sum(np.mean(img, axis=(0, 1)) * _UNILM_CONTRAST_WEIGHTS)
  table = np.array([(v - mean) * factor + mean for v in range(256)]).clip(0, 255)
  return table.astype(np.uint8)[img]


def _brightness(img: np.ndarray, factor: float) -> np.ndarray:
  table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
  return table[img]


def _smooth(img: np.ndarray) -> np.ndarray:
  """OpenCV filter2D with the 3 x 3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 (reflect-101
  borders, rounded to nearest). A sum over 13 never lies within 1/26 of a .5, so float64 rounds
  as OpenCV's float32 does."""
  h, w = img.shape[:2]
  rows = np.abs(np.arange(-1, h + 1))
  rows = np.where(rows > h - 1, 2 * (h - 1) - rows, rows)
  cols = np.abs(np.arange(-1, w + 1))
  cols = np.where(cols > w - 1, 2 * (w - 1) - cols, cols)
  p = img.astype(np.float64)[rows][:, cols]
  total = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  total = total + 4.0 * p[1:h + 1, 1:w + 1]
  return np.rint(total / 13.0).clip(0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  degenerate = _smooth(img)
  if factor == 0.0:
    return degenerate
  if factor == 1.0:
    return img
  out = img.astype(np.float32)
  d = degenerate.astype(np.float32)[1:-1, 1:-1]
  out[1:-1, 1:-1] = d + np.float32(factor) * (out[1:-1, 1:-1] - d)
  return _wrap_uint8(out)


def _posterize(img: np.ndarray, bits: int) -> np.ndarray:
  return np.bitwise_and(img, np.uint8((255 << (8 - bits)) & 255))


# OpenCV's warpAffine with INTER_LINEAR: coordinates on a 1/32 px grid, integer weights that sum
# to 2^15 (imgwarp.cpp: AB_BITS 10, INTER_BITS 5, INTER_REMAP_COEF_BITS 15).
_AB_SCALE = 1024
_TAB = 32


def _warp_affine(img: np.ndarray, m: np.ndarray, fill: int) -> np.ndarray:
  """OpenCV `warpAffine(img, m, (W, H), borderValue=(fill,) * 3)`: `m` (2, 3) maps source to
  destination (OpenCV inverts it in float64), bilinear, constant border."""
  a = np.asarray(m, np.float64).ravel().copy()
  d = a[0] * a[4] - a[1] * a[3]
  d = 1.0 / d if d != 0 else 0.0
  a11, a22 = a[4] * d, a[0] * d
  a[0], a[1], a[3], a[4] = a11, a[1] * -d, a[3] * -d, a22
  b1 = -a[0] * a[2] - a[1] * a[5]
  b2 = -a[3] * a[2] - a[4] * a[5]
  a[2], a[5] = b1, b2
  h, w = img.shape[:2]
  xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
  round_delta = _AB_SCALE // _TAB // 2
  x0 = np.rint((a[1] * ys + a[2]) * _AB_SCALE).astype(np.int64)[:, None] + round_delta
  y0 = np.rint((a[4] * ys + a[5]) * _AB_SCALE).astype(np.int64)[:, None] + round_delta
  big_x = (x0 + np.rint(a[0] * xs * _AB_SCALE).astype(np.int64)[None, :]) >> 5
  big_y = (y0 + np.rint(a[3] * xs * _AB_SCALE).astype(np.int64)[None, :]) >> 5
  sx, sy = big_x >> 5, big_y >> 5
  fx, fy = big_x & (_TAB - 1), big_y & (_TAB - 1)
  weights = ((_TAB - fy) * (_TAB - fx), (_TAB - fy) * fx, fy * (_TAB - fx), fy * fx)
  total = np.zeros(img.shape, np.int64)
  src = img.astype(np.int64)
  for (dy, dx), wt in zip(((0, 0), (0, 1), (1, 0), (1, 1)), weights):
    yy, xx = sy + dy, sx + dx
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    v = np.where(inside[..., None], src[yy.clip(0, h - 1), xx.clip(0, w - 1)], fill)
    total += v * (wt * _TAB)[..., None]
  out = (total + (1 << 14)) >> 15
  return out.clip(0, 255).astype(np.uint8)


def _rotate(img: np.ndarray, degrees: float, fill: int) -> np.ndarray:
  """OpenCV getRotationMatrix2D((W / 2, H / 2), degrees, 1) + warpAffine (counter-clockwise)."""
  h, w = img.shape[:2]
  cx, cy = w / 2, h / 2
  angle = degrees * math.pi / 180
  alpha, beta = math.cos(angle), math.sin(angle)
  m = [[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]]
  return _warp_affine(img, np.array(m), fill)


def _affine32(m) -> np.ndarray:
  return np.array(m, np.float32)   # randaug.py builds shear / translate matrices in float32


_UNILM_FUNCS = {
    'Identity': lambda img: img,
    'AutoContrast': _autocontrast,
    'Equalize': _equalize,
    'Rotate': _rotate,
    'Solarize': _solarize,
    'Color': _color,
    'Contrast': _contrast,
    'Brightness': _brightness,
    'Sharpness': _sharpness,
    'ShearX': lambda img, f, fill: _warp_affine(img, _affine32([[1, f, 0], [0, 1, 0]]), fill),
    'ShearY': lambda img, f, fill: _warp_affine(img, _affine32([[1, 0, 0], [f, 1, 0]]), fill),
    'TranslateX': lambda img, o, fill: _warp_affine(img, _affine32([[1, 0, -o], [0, 1, 0]]),
                                                    fill),
    'TranslateY': lambda img, o, fill: _warp_affine(img, _affine32([[1, 0, 0], [0, 1, -o]]),
                                                    fill),
    'Posterize': _posterize,
}


def _check_op(name: str, known: Sequence[str], what: str) -> None:
  if name not in known:
    raise ValueError(f'unknown {what} op {name!r}; expected one of {list(known)}')


def unilm_op_args(name: str, magnitude: float, negate: bool = False,
                  fill: int = UNILM_FILL) -> tuple:
  """randaug.py's `arg_dict[name](magnitude)` with its sign draw given.

  Args:
    name: an op of `UNILM_OPS`.
    magnitude: level in [0, 10] (unilm: 7).
    negate: the signed ops (`Rotate`, `Shear*`, `Translate*`) use -magnitude.
    fill: border value of the geometric ops (uint8, every channel).

  Returns:
    The op's arguments after the image: enhance factor m / 10 * 1.8 + 0.1; shear m / 10 * 0.3;
    translate m / 10 * 10 px; rotate m / 10 * 30 degrees; solarize threshold int(m / 10 * 256);
    posterize bits int(m / 10 * 4); the geometric ops also take `fill`.
  """
  _check_op(name, UNILM_OPS, 'RandomAugment')
  level = magnitude / UNILM_MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if name in ('Identity', 'AutoContrast', 'Equalize'):
    return ()
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (level * 1.8 + 0.1,)
  if name == 'Solarize':
    return (int(level * 256),)
  if name == 'Posterize':
    return (int(level * 4),)
  scale = {'Rotate': 30.0, 'ShearX': 0.3, 'ShearY': 0.3, 'TranslateX': UNILM_TRANSLATE_CONST,
           'TranslateY': UNILM_TRANSLATE_CONST}[name]
  return (sign * level * scale, fill)


def apply_unilm_op(image: np.ndarray, name: str, *args) -> np.ndarray:
  """One op of randaug.py (`func_dict[name](image, *args)`) on a uint8 (H, W, 3) RGB image;
  returns uint8 (H, W, 3). `args` as `unilm_op_args` gives them."""
  _check_op(name, UNILM_OPS, 'RandomAugment')
  return _UNILM_FUNCS[name](_check_image(image), *args)


# An op draw: (name, applied, negate, magnitude); timm draws a magnitude per op, unilm does not.
OpDraw = tuple[str, bool, bool, float]


@dataclasses.dataclass(frozen=True)
class RandomAugment:
  """unilm's `RandomAugment(num_ops, magnitude, augs=ops)` (beit3/randaug.py).

  Attributes:
    num_ops: ops drawn per image, uniformly with replacement (unilm: 2).
    magnitude: level of every op, of 10 (unilm: 7).
    ops: the op list (unilm's VL tasks: `UNILM_VL_OPS`).
    prob: probability of applying each drawn op (randaug.py: 0.5).
    fill: border value of the geometric ops (randaug.py: 128).
  """
  num_ops: int = 2
  magnitude: float = 7.0
  ops: tuple[str, ...] = UNILM_VL_OPS
  prob: float = 0.5
  fill: int = UNILM_FILL

  def __post_init__(self):
    for op in self.ops:
      _check_op(op, UNILM_OPS, 'RandomAugment')
    if not self.ops or self.num_ops < 0 or not 0 <= self.magnitude <= UNILM_MAX_LEVEL:
      raise ValueError(f'RandomAugment needs ops, num_ops >= 0 and magnitude in [0, 10], got '
                       f'{self}')

  def draw(self, rng: np.random.Generator) -> list[OpDraw]:
    """The ops of one image, in order: (name, applied, negate, magnitude)."""
    names = [self.ops[i] for i in rng.integers(len(self.ops), size=self.num_ops)]
    out = []
    for name in names:
      applied = bool(rng.random() <= self.prob)   # randaug.py skips when random() > prob
      negate = applied and name in _UNILM_SIGNED and bool(rng.random() < 0.5)
      out.append((name, applied, negate, float(self.magnitude)))
    return out

  def apply(self, image: np.ndarray, draws: Sequence[OpDraw]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): the applied ops of `draws`, in order."""
    image = _check_image(image)
    for name, applied, negate, magnitude in draws:
      if applied:
        image = apply_unilm_op(image, name, *unilm_op_args(name, magnitude, negate, self.fill))
    return image

  def __call__(self, rng: np.random.Generator, image) -> np.ndarray:
    return self.apply(np.asarray(image), self.draw(rng))


# ----------------------------------------------------------------------------------------------
# timm's RandAugment (timm 0.6.13 timm/data/auto_augment.py).

TIMM_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel')
TIMM_INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                       'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                       'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                       'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
# timm's `_RAND_CHOICE_WEIGHTS_0` ('w0'), by TIMM_OPS position (timm indexes them so for either
# op list).
_TIMM_WEIGHTS_0 = (0.025, 0.005, 0, 0.3, 0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2,
                   0.1, 0.1)
TIMM_LEVEL_DENOM = 10.0
TIMM_TRANSLATE_PCT = 0.45
_TIMM_SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
                'TranslateX', 'TranslateY', 'ColorIncreasing', 'ContrastIncreasing',
                'BrightnessIncreasing', 'SharpnessIncreasing')
_TIMM_ALL = tuple(dict.fromkeys(TIMM_OPS + TIMM_INCREASING_OPS))
_PIL_RESAMPLE = {'nearest': Image.Resampling.NEAREST, 'bilinear': Image.Resampling.BILINEAR,
                 'bicubic': Image.Resampling.BICUBIC}


def timm_op_args(name: str, magnitude: float, negate: bool = False,
                 translate_pct: float = TIMM_TRANSLATE_PCT) -> tuple:
  """timm's `LEVEL_TO_ARG[name](magnitude)` with its sign draw given (`negate`).

  Args:
    name: an op of `TIMM_OPS` or `TIMM_INCREASING_OPS`.
    magnitude: level, already drawn and clipped to [0, magnitude_max].
    negate: the sign draw of the signed ops (rotate, shear, translate, *Increasing enhance).
    translate_pct: translation at magnitude 10, a fraction of the side.

  Returns:
    The op's arguments after the image: rotate degrees (m / 10 * 30); shear factor (m / 10 *
    0.3); translate fraction (m / 10 * translate_pct); enhance factor m / 10 * 1.8 + 0.1, or
    max(0.1, 1 +- m / 10 * 0.9) for *Increasing; posterize bits int(m / 10 * 4) (Increasing:
    4 - that); solarize threshold int(m / 10 * 256) (Increasing: 256 - that); solarize-add
    int(m / 10 * 110).
  """
  _check_op(name, _TIMM_ALL, 'RandAugment')
  level = magnitude / TIMM_LEVEL_DENOM
  sign = -1.0 if negate else 1.0
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (level * 1.8 + 0.1,)
  if name.endswith('Increasing') and not name.startswith(('Posterize', 'Solarize')):
    return (max(0.1, 1.0 + sign * level * 0.9),)
  if name == 'Posterize':
    return (int(level * 4),)
  if name == 'PosterizeIncreasing':
    return (4 - int(level * 4),)
  if name == 'Solarize':
    return (int(level * 256),)
  if name == 'SolarizeIncreasing':
    return (256 - int(level * 256),)
  if name == 'SolarizeAdd':
    return (int(level * 110),)
  if name == 'Rotate':
    return (sign * level * 30.0,)
  if name in ('ShearX', 'ShearY'):
    return (sign * level * 0.3,)
  return (sign * level * translate_pct,)


def apply_timm_op(image, name: str, *args, fill: Sequence[int] = (128, 128, 128),
                  interpolation: str = 'bicubic') -> np.ndarray:
  """One op of timm's RandAugment (`NAME_TO_OP[name](img, *args, fillcolor=fill,
  resample=interpolation)`), with PIL.

  Args:
    image: uint8 (H, W, 3) array or RGB PIL image.
    name: an op of `TIMM_OPS` / `TIMM_INCREASING_OPS`.
    *args: as `timm_op_args` gives them.
    fill: uint8 RGB of the uncovered area of the geometric ops (timm: round(255 * mean)).
    interpolation: 'bicubic' (unilm's --train_interpolation), 'bilinear' or 'nearest'.

  Returns:
    uint8 (H, W, 3).
  """
  _check_op(name, _TIMM_ALL, 'RandAugment')
  if interpolation not in _PIL_RESAMPLE:
    raise ValueError(f'RandAugment interpolation {interpolation!r}; expected one of '
                     f'{sorted(_PIL_RESAMPLE)}')
  img = image if isinstance(image, Image.Image) else Image.fromarray(_check_image(image))
  kw = dict(fillcolor=tuple(int(v) for v in fill), resample=_PIL_RESAMPLE[interpolation])
  base = name.replace('Increasing', '')
  if base == 'AutoContrast':
    out = ImageOps.autocontrast(img)
  elif base == 'Equalize':
    out = ImageOps.equalize(img)
  elif base == 'Invert':
    out = ImageOps.invert(img)
  elif base == 'Rotate':
    out = img.rotate(args[0], **kw)
  elif base == 'Posterize':
    if args[0] <= 0:     # Pillow < 10 keeps 0 bits (black); newer Pillow refuses 0 bits
      out = Image.new('RGB', img.size)
    else:
      out = img if args[0] >= 8 else ImageOps.posterize(img, args[0])
  elif base == 'Solarize':
    out = ImageOps.solarize(img, args[0])
  elif base == 'SolarizeAdd':
    lut = [min(255, i + args[0]) if i < 128 else i for i in range(256)]
    out = img.point(lut * 3)
  elif base in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    out = getattr(ImageEnhance, base)(img).enhance(args[0])
  else:
    pixels = {'TranslateXRel': args[0] * img.size[0], 'TranslateYRel': args[0] * img.size[1]}
    a = {'ShearX': (1, args[0], 0, 0, 1, 0), 'ShearY': (1, 0, 0, args[0], 1, 0),
         'TranslateXRel': (1, 0, pixels.get('TranslateXRel'), 0, 1, 0),
         'TranslateYRel': (1, 0, 0, 0, 1, pixels.get('TranslateYRel'))}[base]
    out = img.transform(img.size, Image.Transform.AFFINE, a, **kw)
  return np.array(out)


@dataclasses.dataclass(frozen=True)
class TimmRandAugment:
  """timm's `RandAugment(rand_augment_ops(magnitude, hparams, ops), num_layers, weights)`.

  Attributes:
    ops: the op list (timm 'inc1': `TIMM_INCREASING_OPS`).
    num_layers: ops per image ('n', timm default 2).
    magnitude: level ('m', timm default 10).
    magnitude_std: 'mstd': each applied op's level ~ N(magnitude, std); inf = U(0, magnitude).
    magnitude_max: 'mmax': the level is clipped to [0, magnitude_max] (timm default 10).
    choice_weights: None = uniform with replacement; else ('w0') these probabilities per op,
      without replacement.
    prob: probability of applying each drawn op (timm: 0.5).
    fill: uint8 RGB fill of the geometric ops (timm: round(255 * the normalisation mean)).
    interpolation: resampling of the geometric ops (unilm: bicubic).
  """
  ops: tuple[str, ...] = TIMM_INCREASING_OPS
  num_layers: int = 2
  magnitude: float = 10.0
  magnitude_std: float = 0.0
  magnitude_max: float = TIMM_LEVEL_DENOM
  choice_weights: tuple[float, ...] | None = None
  prob: float = 0.5
  fill: tuple[int, int, int] = (128, 128, 128)
  interpolation: str = 'bicubic'

  def draw(self, rng: np.random.Generator) -> list[OpDraw]:
    """The ops of one image, in order: (name, applied, negate, clipped magnitude)."""
    p = None if self.choice_weights is None else np.asarray(self.choice_weights, np.float64)
    idx = rng.choice(len(self.ops), self.num_layers, replace=p is None, p=p)
    out = []
    for name in (self.ops[i] for i in idx):
      applied = bool(self.prob >= 1.0 or rng.random() <= self.prob)
      m = float(self.magnitude)
      if applied and self.magnitude_std == float('inf'):
        m = float(rng.uniform(0, m))
      elif applied and self.magnitude_std > 0:
        m = float(rng.normal(m, self.magnitude_std))
      m = max(0.0, min(m, self.magnitude_max))
      negate = applied and name in _TIMM_SIGNED and bool(rng.random() < 0.5)
      out.append((name, applied, negate, m))
    return out

  def apply(self, image, draws: Sequence[OpDraw]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H, W, 3): the applied ops of `draws`, in order."""
    image = _check_image(image)
    for name, applied, negate, m in draws:
      if applied:
        image = apply_timm_op(image, name, *timm_op_args(name, m, negate), fill=self.fill,
                              interpolation=self.interpolation)
    return image

  def __call__(self, rng: np.random.Generator, image) -> np.ndarray:
    return self.apply(np.asarray(image), self.draw(rng))


def parse_rand_augment(spec: str, fill: Sequence[int] = (128, 128, 128),
                       interpolation: str = 'bicubic',
                       field: str = 'data.rand_augment') -> TimmRandAugment:
  """timm's `rand_augment_transform(spec)` config string, e.g. 'rand-m9-mstd0.5-inc1'.

  Sections after 'rand', '-'-separated, any order: m<int> magnitude, n<int> ops per image,
  mstd<float> magnitude std (> 100 = uniform), mmax<int> magnitude bound, inc<int> increasing
  ops (any value, 'inc0' included, as timm 0.6.13 reads it), w0 choice weights. Raises
  ValueError naming `field` for anything else.
  """
  def bad(why: str) -> ValueError:
    return ValueError(f'{field}={spec!r}: {why}; expected a timm RandAugment string such as '
                      "'rand-m9-mstd0.5-inc1' (sections m<int>, n<int>, mstd<float>, "
                      'mmax<int>, inc<0|1>, w0)')

  parts = str(spec).split('-')
  if parts[0] != 'rand':
    raise bad("it does not start with 'rand'")
  kw: dict[str, Any] = {}
  ops, weight_idx = TIMM_OPS, None
  for part in parts[1:]:
    m = re.fullmatch(r'([a-z]+)(\d.*)', part)
    if m is None:
      raise bad(f'section {part!r} has no value')
    key, val = m.groups()
    try:
      if key == 'm':
        kw['magnitude'] = float(int(val))
      elif key == 'n':
        kw['num_layers'] = int(val)
      elif key == 'mstd':
        std = float(val)
        kw['magnitude_std'] = float('inf') if std > 100 else std
      elif key == 'mmax':
        kw['magnitude_max'] = float(int(val))
      elif key == 'inc':
        int(val)
        ops = TIMM_INCREASING_OPS   # timm tests bool(val) of the string: 'inc0' turns it on too
      elif key == 'w':
        weight_idx = int(val)
      else:
        raise bad(f'unknown section {part!r}')
    except ValueError as e:
      if str(e).startswith(field):
        raise
      raise bad(f'section {part!r} has a malformed value') from None
  if weight_idx not in (None, 0):
    raise bad(f'only weights w0 exist, got w{weight_idx}')
  if kw.get('num_layers', 2) < 1 or kw.get('magnitude_std', 0.0) < 0:
    raise bad('n must be >= 1 and mstd >= 0')
  weights = None
  if weight_idx == 0:
    w = np.asarray(_TIMM_WEIGHTS_0, np.float64)
    weights = tuple(float(x) for x in w / w.sum())
  if interpolation not in _PIL_RESAMPLE:
    raise ValueError(f'RandAugment interpolation {interpolation!r}; expected one of '
                     f'{sorted(_PIL_RESAMPLE)}')
  return TimmRandAugment(ops=ops, choice_weights=weights, fill=tuple(int(v) for v in fill),
                         interpolation=interpolation, **kw)


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
  """timm's fill of its geometric ops: min(255, round(255 * mean)) per channel (uint8 RGB)."""
  return tuple(min(255, round(255 * float(x))) for x in mean)


@functools.lru_cache(maxsize=32)
def make_augmenter(spec: str, fill: tuple[int, ...] = (128, 128, 128),
                   interpolation: str = 'bicubic', field: str = 'data.rand_augment'):
  """The augmenter of a config string, or None.

  Args:
    spec: '' (none); 'unilm' = unilm's `RandomAugment(2, 7)` over `UNILM_VL_OPS`, optionally
      with sections n<int> / m<number> ('unilm-n2-m7'); or a timm string 'rand-...'
      (`parse_rand_augment`).
    fill: the timm ops' fill (uint8 RGB; `mean_fill` of the normalisation mean). unilm's ops
      always fill with 128.
    interpolation: the timm ops' resampling.
    field: the config field named in errors.

  Returns:
    None, a `RandomAugment` or a `TimmRandAugment`: callables (rng, uint8 image) -> uint8.
  """
  spec = str(spec)
  if not spec:
    return None
  if spec == 'unilm' or spec.startswith('unilm-'):
    kw: dict[str, Any] = {}
    for part in spec.split('-')[1:]:
      m = re.fullmatch(r'(n|m)(\d+(?:\.\d+)?)', part)
      if m is None:
        raise ValueError(f"{field}={spec!r}: unknown section {part!r}; expected 'unilm' or "
                         "'unilm-n<ops>-m<magnitude 0-10>' (unilm's RandomAugment(2, 7))")
      kw['num_ops' if m.group(1) == 'n' else 'magnitude'] = (
          int(float(m.group(2))) if m.group(1) == 'n' else float(m.group(2)))
    try:
      return RandomAugment(**kw)
    except ValueError as e:
      raise ValueError(f'{field}={spec!r}: {e}') from None
  if spec.startswith('rand'):
    return parse_rand_augment(spec, fill, interpolation, field)
  raise ValueError(f"{field}={spec!r}: expected '' (off), 'unilm' (unilm's RandomAugment(2, 7) "
                   "of the VL tasks) or a timm RandAugment string such as "
                   "'rand-m9-mstd0.5-inc1' (unilm's ImageNet recipe)")


# ----------------------------------------------------------------------------------------------
# timm's RandomErasing (timm 0.6.13 timm/data/random_erasing.py).

ERASE_MODES = ('pixel', 'rand', 'const')
Box = tuple[int, int, int, int]   # (top, left, h, w) in px


@dataclasses.dataclass(frozen=True)
class RandomErasing:
  """timm's `RandomErasing(prob, mode=mode, max_count=max_count)` on a normalised image.

  Attributes:
    prob: probability of erasing an image (unilm --reprob 0.25).
    mode: 'pixel' per-pixel N(0, 1) (unilm --remode), 'rand' one N(0, 1) colour per box,
      'const' zeros (normalised units).
    max_count: boxes per image; with min_count < max_count the count is uniform in between
      (unilm --recount 1).
    min_count: fewest boxes.
    min_area, max_area: box area range, a fraction of the image (divided by the count).
    min_aspect: box aspect h / w in [min_aspect, 1 / min_aspect], log-uniform.
  """
  prob: float = 0.25
  mode: str = 'pixel'
  max_count: int = 1
  min_count: int = 1
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3

  def __post_init__(self):
    if not 0.0 <= self.prob <= 1.0:
      raise ValueError(f'data.random_erasing={self.prob}: expected a probability in [0, 1]')
    if self.mode not in ERASE_MODES:
      raise ValueError(f'data.random_erasing_mode={self.mode!r}: expected one of '
                       f'{list(ERASE_MODES)}')
    if not 1 <= self.min_count <= self.max_count:
      raise ValueError(f'data.random_erasing_count={self.max_count}: expected an int >= 1')
    if not 0 < self.min_area <= self.max_area <= 1 or not 0 < self.min_aspect <= 1:
      raise ValueError(f'random erasing: areas {self.min_area}-{self.max_area} and min aspect '
                       f'{self.min_aspect} must lie in (0, 1]')

  @property
  def log_aspect(self) -> tuple[float, float]:
    return math.log(self.min_aspect), math.log(1 / self.min_aspect)

  def boxes(self, rng: np.random.Generator, height: int, width: int) -> list[Box]:
    """The rectangles of one (height, width) image: [] when not erased."""
    if rng.random() > self.prob:
      return []
    count = (self.min_count if self.min_count == self.max_count else
             int(rng.integers(self.min_count, self.max_count + 1)))
    out = []
    for _ in range(count):
      for _ in range(10):
        area = rng.uniform(self.min_area, self.max_area) * height * width / count
        aspect = math.exp(rng.uniform(*self.log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
          out.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)),
                      h, w))
          break
    return out

  def values(self, rng: np.random.Generator, box: Box, channels: int) -> np.ndarray:
    """float32 fill of one box: (h, w, C) noise ('pixel'), (1, 1, C) ('rand'), zeros ('const')."""
    _, _, h, w = box
    if self.mode == 'pixel':
      return rng.standard_normal((h, w, channels), np.float32)
    if self.mode == 'rand':
      return rng.standard_normal((1, 1, channels), np.float32)
    return np.zeros((1, 1, channels), np.float32)

  def __call__(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """float (H, W, C) normalised -> erased copy."""
    boxes = self.boxes(rng, *np.shape(image)[:2])
    return erase(image, boxes, [self.values(rng, b, np.shape(image)[2]) for b in boxes])


def erase(image: np.ndarray, boxes: Sequence[Box], values: Sequence[np.ndarray]) -> np.ndarray:
  """Writes `values[i]` (broadcast to (h, w, C)) into `boxes[i]` of a float (H, W, C) image,
  in order; returns a copy."""
  out = np.array(image, copy=True)
  for (top, left, h, w), v in zip(boxes, values):
    out[top:top + h, left:left + w] = v
  return out


def erase_on_device(images, key, cfg: RandomErasing):
  """timm's RandomErasing of each image of a normalised batch, drawn on the device (jittable).

  Args:
    images: float (B, H, W, C), normalised.
    key: a jax PRNG key (the step's; every draw follows from it).
    cfg: the erasing settings (`prob` 0 returns `images`).

  Returns:
    float (B, H, W, C) of the same dtype: erased boxes replaced per `cfg.mode`.
  """
  if cfg.prob <= 0:
    return images
  b, height, width, c = images.shape
  k_apply, k_count, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 7)
  kmax, attempts = cfg.max_count, 10
  applied = jax.random.uniform(k_apply, (b,)) <= cfg.prob
  count = jax.random.randint(k_count, (b,), cfg.min_count, cfg.max_count + 1)
  area = (jax.random.uniform(k_area, (b, kmax, attempts), minval=cfg.min_area,
                             maxval=cfg.max_area) * (height * width) / count[:, None, None])
  lo, hi = cfg.log_aspect
  aspect = jnp.exp(jax.random.uniform(k_aspect, (b, kmax, attempts), minval=lo, maxval=hi))
  # Python's round (half to even), as timm's int(round(.)).
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits, axis=-1)                         # the first attempt that fits
  found = jnp.any(fits, axis=-1) & applied[:, None] & (jnp.arange(kmax)[None] < count[:, None])
  h = jnp.take_along_axis(h, first[..., None], -1)[..., 0]
  w = jnp.take_along_axis(w, first[..., None], -1)[..., 0]
  top = jnp.floor(jax.random.uniform(k_top, (b, kmax)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b, kmax)) * (width - w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, None, :, None]
  cols = jnp.arange(width)[None, None, None, :]
  inside = (found[..., None, None] & (rows >= top[..., None, None])
            & (rows < (top + h)[..., None, None]) & (cols >= left[..., None, None])
            & (cols < (left + w)[..., None, None]))          # (B, K, H, W)
  if cfg.mode == 'pixel':
    noise = jax.random.normal(k_noise, (b, kmax, height, width, c), images.dtype)
  elif cfg.mode == 'rand':
    noise = jax.random.normal(k_noise, (b, kmax, 1, 1, c), images.dtype)
  else:
    noise = jnp.zeros((b, kmax, 1, 1, c), images.dtype)
  out = images
  for i in range(kmax):        # later boxes over earlier ones, as timm
    out = jnp.where(inside[:, i, ..., None], jnp.broadcast_to(noise[:, i], out.shape), out)
  return out
