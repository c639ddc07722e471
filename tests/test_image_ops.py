"""Tests of the host image preprocessing (beit3_jax/data/image_ops.py)."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from beit3_jax.data import image_ops as ops


def _photo(h, w, seed=0):
  """A smooth, photo-like uint8 (h, w, 3) image: low-frequency noise plus gradients."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
  yy, xx = np.mgrid[0:h, 0:w]
  smooth[..., 0] = 0.5 * smooth[..., 0] + 100 * xx / w
  smooth[..., 2] = 0.5 * smooth[..., 2] + 100 * yy / h
  return np.clip(smooth, 0, 255).astype(np.uint8)


def _encode(array_or_image, fmt, **kwargs):
  im = array_or_image
  if not isinstance(im, Image.Image):
    im = Image.fromarray(im)
  buf = io.BytesIO()
  im.save(buf, fmt, **kwargs)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# decode


def test_decode_png_is_lossless_and_jpeg_close():
  img = _photo(60, 80)
  png = ops.decode(_encode(img, 'PNG'))
  assert png.dtype == np.uint8 and png.shape == (60, 80, 3)
  np.testing.assert_array_equal(png, img)
  jpg = ops.decode(_encode(img, 'JPEG', quality=95))
  assert jpg.dtype == np.uint8 and jpg.shape == (60, 80, 3)
  assert np.abs(jpg.astype(int) - img).mean() < 3


def test_decode_pil_matches_decode_and_outputs_are_writable():
  data = _encode(_photo(30, 40), 'JPEG')
  im = ops.decode_pil(data)
  assert isinstance(im, Image.Image) and im.mode == 'RGB' and im.size == (40, 30)
  arr = ops.decode(data)
  np.testing.assert_array_equal(np.asarray(im), arr)
  assert arr.flags.writeable
  out = ops.augment(np.random.default_rng(0), im, ops.ImageAugConfig(size=16, second_size=8))
  assert out['image'].flags.writeable and out['tokenizer_image'].flags.writeable
  with pytest.raises(ops.CorruptImageError):
    ops.decode_pil(b'garbage')


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_decode_other_modes_become_rgb(mode):
  img = _photo(20, 30)
  fmt = 'JPEG' if mode == 'CMYK' else 'PNG'
  data = _encode(Image.fromarray(img).convert(mode), fmt)
  out = ops.decode(data)
  assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
  if mode == 'L':
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
  if mode == 'RGBA':
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize('data', [b'', b'not an image at all', b'\x89PNG\r\n\x1a\n' + b'\0' * 40])
def test_decode_garbage_raises(data):
  with pytest.raises(ops.CorruptImageError):
    ops.decode(data)


def test_decode_truncated_jpeg_raises():
  data = _encode(_photo(64, 64), 'JPEG')
  with pytest.raises(ops.CorruptImageError):
    ops.decode(data[:len(data) // 2])
  assert issubclass(ops.CorruptImageError, ValueError)
  with pytest.raises(TypeError):
    ops.decode('a path, not bytes')


# ----------------------------------------------------------------------------------------------
# random_resized_crop_params


@pytest.mark.parametrize('height,width', [(300, 200), (200, 300)])
def test_random_resized_crop_params_bounds(height, width):
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  boxes = np.array([ops.random_resized_crop_params(rng, height, width, scale, ratio)
                    for _ in range(2000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # w and h are rounded, so allow half a pixel on each side.
  area = height * width
  assert ((h - 0.5) * (w - 0.5) <= scale[1] * area).all()
  assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all()
  assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
  assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
  # The area fraction covers the range, and the corner is spread over the free space.
  frac = h * w / area
  # (The largest crop with aspect in range is 267 x 200, 0.89 of the area.)
  assert frac.min() < 0.1 and frac.max() > 0.8
  assert len(np.unique(top)) > 50 and len(np.unique(left)) > 50


def test_random_resized_crop_params_deterministic():
  draw = lambda seed: [ops.random_resized_crop_params(np.random.default_rng(seed), 300, 200)
                       for _ in range(5)]
  assert draw(3) == draw(3)
  seq = lambda seed: (lambda r: [ops.random_resized_crop_params(r, 300, 200)
                                 for _ in range(20)])(np.random.default_rng(seed))
  assert seq(1) == seq(1) and seq(1) != seq(2)


def test_random_resized_crop_params_fallback_is_central_and_ratio_clamped():
  rng = np.random.default_rng(0)
  # A 10 x 1000 strip: no crop of >= 90% area has an aspect ratio in [3/4, 4/3].
  top, left, h, w = ops.random_resized_crop_params(rng, 10, 1000, (0.9, 1.0))
  assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2
  top, left, h, w = ops.random_resized_crop_params(rng, 1000, 10, (0.9, 1.0))
  assert (h, w) == (round(10 / (3 / 4)), 10) and left == 0 and top == (1000 - h) // 2
  with pytest.raises(ValueError):
    ops.random_resized_crop_params(rng, 10, 10, scale=(0.5, 0.1))


# ----------------------------------------------------------------------------------------------
# random_resized_crop, flip, two_view_crop


def test_random_resized_crop_shape_and_determinism():
  img = _photo(375, 500)
  a = ops.random_resized_crop(np.random.default_rng(5), img, 224)
  b = ops.random_resized_crop(np.random.default_rng(5), Image.fromarray(img), 224)
  assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError):
    ops.random_resized_crop(np.random.default_rng(5), img, 224, interpolation='cubic')
  with pytest.raises(ValueError):
    ops.random_resized_crop(np.random.default_rng(5), img[..., :2], 224)


def test_horizontal_flip():
  img = _photo(8, 12)
  np.testing.assert_array_equal(ops.horizontal_flip(np.random.default_rng(0), img, 1.0),
                                img[:, ::-1])
  np.testing.assert_array_equal(ops.horizontal_flip(np.random.default_rng(0), img, 0.0), img)
  flips = [ops.horizontal_flip(np.random.default_rng(s), img)[0, 0, 0] != img[0, 0, 0]
           for s in range(200)]
  assert 60 < sum(flips) < 140


def _orientation(view):
  """+1 if the red channel grows left to right, -1 if it shrinks."""
  r = view[..., 0].astype(np.float64)
  half = r.shape[1] // 2
  return np.sign(r[:, half:].mean() - r[:, :half].mean())


def test_two_view_crop_shares_crop_and_flip():
  h, w = 300, 400
  img = np.zeros((h, w, 3), np.uint8)
  img[..., 0] = np.linspace(0, 255, w)[None, :]  # Red ramps left to right.
  img[..., 1] = _photo(h, w)[..., 1]
  orientations = []
  for seed in range(40):
    view, tok = ops.two_view_crop(np.random.default_rng(seed), img, 64, 32, scale=(0.3, 1.0))
    assert view.shape == (64, 64, 3) and tok.shape == (32, 32, 3)
    assert view.dtype == tok.dtype == np.uint8
    assert _orientation(view) == _orientation(tok) != 0
    orientations.append(_orientation(view))
  assert 5 < orientations.count(-1) < 35  # Both flipped and unflipped cases were seen.


def test_two_view_crop_same_region_as_single_view():
  img = _photo(375, 500)
  for seed in range(10):
    view, tok = ops.two_view_crop(np.random.default_rng(seed), img, 224, 112, flip_prob=0.0,
                                  second_interpolation='bicubic')
    # Same draws for the crop box as random_resized_crop.
    np.testing.assert_array_equal(view, ops.random_resized_crop(np.random.default_rng(seed), img,
                                                                224))
    # The tokenizer view is (close to) the model view resized to its size.
    small = np.asarray(Image.fromarray(view).resize((112, 112), Image.Resampling.BICUBIC))
    assert np.abs(small.astype(int) - tok).mean() < 2.0


# ----------------------------------------------------------------------------------------------
# colour jitter


def test_color_jitter_identity_when_off():
  img = _photo(40, 50)
  out = ops.color_jitter(np.random.default_rng(0), img, 0, 0, 0, 0)
  np.testing.assert_array_equal(out, img)
  assert ops.color_jitter_params(np.random.default_rng(0), 0, 0, 0, 0) == ()
  # A (1, 1) range is also "off", and so is a factor exactly 1.
  np.testing.assert_array_equal(ops.color_jitter(np.random.default_rng(0), img, (1, 1), 0, 0), img)
  np.testing.assert_array_equal(ops.apply_color_jitter([img], (('contrast', 1.0),))[0], img)


def test_color_jitter_brightness_only_scales():
  img = (_photo(40, 50) // 2).astype(np.uint8)  # <= 127, so factors <= 2 never clip.
  for seed in range(5):
    (name, f), = ops.color_jitter_params(np.random.default_rng(seed), 0.4, 0, 0)
    assert name == 'brightness' and 0.6 <= f <= 1.4
    out = ops.color_jitter(np.random.default_rng(seed), img, 0.4, 0, 0)
    np.testing.assert_allclose(out, img * f, atol=0.5 + 1e-4)


def test_color_jitter_zero_saturation_is_grayscale():
  img = _photo(40, 50)
  out = ops.color_jitter(np.random.default_rng(0), img, 0, 0, (0.0, 0.0)).astype(int)
  assert np.abs(out[..., 0] - out[..., 1]).max() <= 1
  assert np.abs(out[..., 1] - out[..., 2]).max() <= 1
  gray = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  assert np.abs(out[..., 0] - gray).max() <= 1


def test_color_jitter_zero_contrast_is_flat_gray_mean():
  img = _photo(40, 50)
  out = ops.apply_color_jitter([img], (('contrast', 0.0),))[0]
  gray_mean = (img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).mean()
  assert np.all(np.abs(out.astype(float) - gray_mean) <= 0.5 + 1e-3)


def test_color_jitter_range_order_and_determinism():
  img = _photo(64, 64)
  a = ops.color_jitter(np.random.default_rng(7), img, 0.9, 0.9, 0.9, 0.2)
  b = ops.color_jitter(np.random.default_rng(7), img, 0.9, 0.9, 0.9, 0.2)
  c = ops.color_jitter(np.random.default_rng(8), img, 0.9, 0.9, 0.9, 0.2)
  assert a.dtype == np.uint8 and a.shape == img.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  orders = {tuple(n for n, _ in ops.color_jitter_params(np.random.default_rng(s), hue=0.1))
            for s in range(100)}
  assert len(orders) > 10 and all(sorted(o) == ['brightness', 'contrast', 'hue', 'saturation']
                                  for o in orders)


def test_color_jitter_hue_keeps_gray_and_shifts_color():
  gray = np.full((8, 8, 3), 120, np.uint8)
  np.testing.assert_array_equal(ops.apply_color_jitter([gray], (('hue', 0.3),))[0], gray)
  red = np.zeros((8, 8, 3), np.uint8)
  red[..., 0] = 200
  shifted = ops.apply_color_jitter([red], (('hue', 1 / 3),))[0]  # Red -> green.
  assert shifted[0, 0, 1] > 150 and shifted[0, 0, 0] < 50
  with pytest.raises(ValueError):
    ops.color_jitter_params(np.random.default_rng(0), hue=0.7)


def test_apply_color_jitter_same_map_for_two_views():
  img = _photo(64, 64)
  small = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BOX))
  params = ops.color_jitter_params(np.random.default_rng(3), 0.8, 0.8, 0.8)
  a, b = ops.apply_color_jitter([img, img], params)
  np.testing.assert_array_equal(a, b)
  big, little = ops.apply_color_jitter([img, small], params)
  # Jittering then downsampling ~ downsampling then jittering.
  down = np.asarray(Image.fromarray(big).resize((32, 32), Image.Resampling.BOX))
  assert np.abs(down.astype(int) - little).mean() < 2.0


# ----------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize('xp', [np, jnp])
def test_normalize_known_values(xp):
  px = xp.asarray(np.array([[[0, 0, 0], [255, 255, 255], [128, 64, 32]]], np.uint8))
  out = ops.normalize(px, ops.BEIT3_MEAN, ops.BEIT3_STD)
  assert out.dtype == np.float32 and type(out) is type(px)
  np.testing.assert_array_equal(np.asarray(out[0, :2]), [[-1] * 3, [1] * 3])
  mean, std = np.array(ops.IMAGENET_MEAN), np.array(ops.IMAGENET_STD)
  out = np.asarray(ops.normalize(px, ops.IMAGENET_MEAN, ops.IMAGENET_STD))
  np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-5)
  np.testing.assert_allclose(out[0, 1], (1 - mean) / std, rtol=1e-5)
  np.testing.assert_allclose(out[0, 2], (np.array([128, 64, 32]) / 255 - mean) / std, rtol=1e-5)
  tok = ops.tokenizer_view(px)
  assert tok.dtype == np.float32 and type(tok) is type(px)
  np.testing.assert_array_equal(np.asarray(tok[0, :2]), [[-1] * 3, [1] * 3])
  np.testing.assert_allclose(np.asarray(tok[0, 2]), np.array([128, 64, 32]) / 127.5 - 1, atol=1e-6)


def test_normalize_batch_under_jit_and_range():
  batch = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  host = ops.normalize(batch)
  dev = jax.jit(ops.normalize)(jnp.asarray(batch))
  np.testing.assert_allclose(np.asarray(dev), host, atol=1e-6)
  tok = jax.jit(ops.tokenizer_view)(jnp.asarray(batch))
  assert float(tok.min()) >= -1.0 and float(tok.max()) <= 1.0
  with pytest.raises(TypeError):
    ops.normalize(batch.astype(np.float32))
  with pytest.raises(ValueError):
    ops.tokenizer_view(batch[..., :2])


# ----------------------------------------------------------------------------------------------
# eval transforms


def test_eval_resize():
  img = _photo(375, 500)
  out = ops.eval_resize(img, 224)
  assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
  square = _photo(224, 224)
  np.testing.assert_array_equal(ops.eval_resize(square, 224), square)


def test_resize_shorter_center_crop():
  for shape in [(375, 500), (500, 375), (100, 90)]:
    for crop_pct in (1.0, 0.875):
      out = ops.resize_shorter_center_crop(_photo(*shape), 224, crop_pct)
      assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
  square = _photo(224, 224)
  np.testing.assert_array_equal(ops.resize_shorter_center_crop(square, 224), square)
  wide = _photo(224, 448)  # Shorter side already 224: only the centre crop.
  np.testing.assert_array_equal(ops.resize_shorter_center_crop(wide, 224), wide[:, 112:336])
  # crop_pct 0.875: the 256 px resize of a 256 px square, centre 224.
  sq256 = _photo(256, 256)
  np.testing.assert_array_equal(ops.resize_shorter_center_crop(sq256, 224, 0.875),
                                sq256[16:240, 16:240])


# ----------------------------------------------------------------------------------------------
# augment


def test_augment_pretraining_defaults():
  data = _encode(_photo(375, 500), 'JPEG', quality=90)
  cfg = ops.ImageAugConfig()
  assert cfg.scale == (0.08, 1.0) and cfg.second_size == 224 and cfg.color_jitter == 0.4
  out = ops.augment(np.random.default_rng(0), ops.decode(data), cfg)
  assert out['image'].shape == (224, 224, 3) and out['tokenizer_image'].shape == (224, 224, 3)
  assert out['image'].dtype == out['tokenizer_image'].dtype == np.uint8
  again = ops.augment(np.random.default_rng(0), ops.decode_pil(data), cfg)
  np.testing.assert_array_equal(out['image'], again['image'])
  np.testing.assert_array_equal(out['tokenizer_image'], again['tokenizer_image'])


def test_augment_views_agree_when_interpolations_match():
  img = _photo(375, 500)
  cfg = ops.ImageAugConfig(size=96, second_size=96, second_interpolation='bicubic')
  for seed in range(10):
    out = ops.augment(np.random.default_rng(seed), img, cfg)
    np.testing.assert_array_equal(out['image'], out['tokenizer_image'])


def test_augment_finetune_without_tokenizer_view():
  img = _photo(375, 500)
  cfg = ops.ImageAugConfig(size=64, scale=(0.5, 1.0), color_jitter=0.0, second_size=None,
                           flip_prob=0.0)
  out = ops.augment(np.random.default_rng(4), img, cfg)
  assert out['tokenizer_image'] is None and out['image'].shape == (64, 64, 3)
  np.testing.assert_array_equal(
      out['image'], ops.random_resized_crop(np.random.default_rng(4), img, 64, (0.5, 1.0)))
  with pytest.raises(ValueError):
    ops.ImageAugConfig(scale=(0.0, 1.0))
  with pytest.raises(ValueError):
    ops.ImageAugConfig(interpolation='cubic')
