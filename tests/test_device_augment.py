"""Tests of the device-side augmentation (beit3_jax/data/device_augment.py) against the host
reference (beit3_jax/data/image_ops.py), and of its host half `image_ops.augment_for_device`."""

import io
import itertools

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

from beit3_jax.data import device_augment as dev
from beit3_jax.data import image_ops as ops


def _octave_noise(rng, h, w, octaves=4):
  """float32 (h, w, 3) fractal noise, roughly in [-1, 1]: bicubic-upsampled random grids."""
  out = np.zeros((h, w, 3), np.float32)
  for k in range(octaves):
    cells = 2 ** (k + 2)
    grid = rng.integers(0, 256, (cells * h // max(h, w) + 2, cells * w // max(h, w) + 2, 3),
                        dtype=np.uint8)
    up = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    out += (up / 127.5 - 1.0) * 0.5 ** k
  return out


def _photo(h, w, seed):
  """A photo-like uint8 (h, w, 3) image: gradients, a few hard-edged shapes, octave noise and
  mild Gaussian sensor noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  yy, xx = yy / h, xx / w
  base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * xx[..., None] \
      + rng.uniform(-60, 60, 3) * yy[..., None]
  base += 35.0 * _octave_noise(rng, h, w)
  im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(im)
  for _ in range(5):
    x0, x1 = sorted(rng.uniform(0, w, 2))
    y0, y1 = sorted(rng.uniform(0, h, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse((x0, y0, x1, y1), fill=colour)
    else:
      draw.rectangle((x0, y0, x1, y1), fill=colour)
  x = np.asarray(im, np.float32) + rng.normal(0.0, 2.0, (h, w, 3))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _encode(array, fmt='JPEG', **kwargs):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **kwargs)
  return buf.getvalue()


# (height, width) of the test photos: 320 x 240 and 500 x 375, landscape and portrait.
_SIZES = ((240, 320), (375, 500), (320, 240), (500, 375))


@pytest.fixture(scope='module')
def jpegs():
  """Four photo-like JPEGs (quality 90), as bytes."""
  return [_encode(_photo(h, w, seed=i), quality=90) for i, (h, w) in enumerate(_SIZES)]


@pytest.fixture(scope='module')
def big_jpeg():
  """A 2000 x 1500 photo-like JPEG (quality 90)."""
  return _encode(_photo(1500, 2000, seed=7), quality=90)


def _stack(outs):
  return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


# ----------------------------------------------------------------------------------------------
# Host half: augment_for_device and encode_jitter.


def test_encode_jitter():
  f, o = ops.encode_jitter(())
  np.testing.assert_array_equal(f, [1, 1, 1])
  np.testing.assert_array_equal(o, [0, 1, 2])
  assert f.dtype == np.float32 and o.dtype == np.int32
  f, o = ops.encode_jitter((('saturation', 0.7), ('brightness', 1.2), ('contrast', 0.9)))
  np.testing.assert_allclose(f, [1.2, 0.9, 0.7], rtol=1e-7)
  np.testing.assert_array_equal(o, [2, 0, 1])
  f, o = ops.encode_jitter((('contrast', 1.3),))
  np.testing.assert_allclose(f, [1, 1.3, 1], rtol=1e-7)
  np.testing.assert_array_equal(o, [1, 0, 2])
  with pytest.raises(ValueError, match='hue'):
    ops.encode_jitter((('hue', 0.1),))
  with pytest.raises(ValueError, match='twice'):
    ops.encode_jitter((('contrast', 1.3), ('contrast', 1.1)))


def test_augment_for_device_draws_as_augment(jpegs):
  cfg = ops.ImageAugConfig()  # 224, jitter 0.4, lanczos tokenizer view 224.
  no_jitter = ops.ImageAugConfig(color_jitter=0.0, second_size=None)
  for data, seed in itertools.product(jpegs, range(4)):
    im = ops.decode_pil(data)
    rng = np.random.default_rng(seed)
    out = ops.augment_for_device(rng, data, cfg)
    assert out['image'].dtype == np.uint8 and out['image'].shape == (224, 224, 3)
    assert out['flip'].dtype == np.bool_ and out['flip'].shape == ()
    assert out['jitter'].dtype == np.float32 and out['jitter'].shape == (3,)
    assert out['jitter_order'].dtype == np.int32 and out['jitter_order'].shape == (3,)
    # The same draws, in the same order, as augment: box, flip, jitter order and factors.
    ref = np.random.default_rng(seed)
    ops.random_resized_crop_params(ref, im.height, im.width, cfg.scale, cfg.ratio)
    ref.random()
    params = ops.color_jitter_params(ref, 0.4, 0.4, 0.4, 0.0)
    factors, order = ops.encode_jitter(params)
    np.testing.assert_array_equal(out['jitter'], factors)
    np.testing.assert_array_equal(out['jitter_order'], order)
    assert rng.random() == ref.random()  # The generator is left in the same state.
    # The view is augment's tokenizer view before jitter, bit for bit (no draft at these
    # sizes)...
    np.testing.assert_array_equal(
        ops.finish_on_host(out), ops.two_view_crop(np.random.default_rng(seed), im, 224, 224)[1])
    # ... and jittering it on the host with the drawn params (the contrast mean is the model
    # view's in the reference) gives augment's jittered one.
    jittered = ops.augment(np.random.default_rng(seed), im, cfg)['tokenizer_image']
    model_view = ops.two_view_crop(np.random.default_rng(seed), im, 224, 224)[0]
    np.testing.assert_array_equal(
        ops.apply_color_jitter([model_view, ops.finish_on_host(out)], params)[1], jittered)
    # Without a tokenizer view, the one view is the model's (bicubic).
    np.testing.assert_array_equal(
        ops.finish_on_host(ops.augment_for_device(np.random.default_rng(seed), data, no_jitter)),
        ops.augment(np.random.default_rng(seed), im, no_jitter)['image'])
    # Array and PIL inputs give the same result as bytes.
    for image in (im, np.asarray(im)):
      again = ops.augment_for_device(np.random.default_rng(seed), image, cfg)
      for k in out:
        np.testing.assert_array_equal(again[k], out[k])
  off = ops.augment_for_device(np.random.default_rng(0), jpegs[0], no_jitter)
  np.testing.assert_array_equal(off['jitter'], [1, 1, 1])
  np.testing.assert_array_equal(off['jitter_order'], [0, 1, 2])


# ----------------------------------------------------------------------------------------------
# Device colour jitter.


def test_color_jitter_matches_host(jpegs):
  cfg = ops.ImageAugConfig(size=64, color_jitter=0.0, second_size=None)
  orders = list(itertools.permutations(range(3)))
  ends = [(0.6, 0.6, 0.6), (1.4, 1.4, 1.4), (0.6, 1.4, 0.6), (1.4, 0.6, 1.4), (1.4, 1.4, 0.6)]
  param_sets = [tuple((ops.JITTER_OPS[i], f[i]) for i in o) for o in orders for f in ends]
  rng = np.random.default_rng(0)
  param_sets += [ops.color_jitter_params(rng, 0.4, 0.4, 0.4, 0.0) for _ in range(34)]
  param_sets += [(('contrast', 0.6),), (('brightness', 1.4), ('saturation', 0.6)), ()]
  images, factors, order, host = [], [], [], []
  for i, params in enumerate(param_sets):
    view = ops.augment_for_device(np.random.default_rng(i), jpegs[i % len(jpegs)], cfg)['image']
    f, o = ops.encode_jitter(params)
    images.append(view)
    factors.append(f)
    order.append(o)
    host.append(ops.apply_color_jitter([view], params)[0])
  images, host = np.stack(images), np.stack(host).astype(np.float32)
  out = np.asarray(jax.jit(dev.apply_color_jitter)(images.astype(np.float32), np.stack(factors),
                                                    np.stack(order)))
  assert out.dtype == np.float32 and out.shape == images.shape
  assert out.min() >= 0 and out.max() <= 255
  diff = np.abs(out - host)
  print(f'\ncolour jitter, {len(param_sets)} draws: max |device - host uint8| = '
        f'{diff.max():.4f}, mean {diff.mean():.4f} (0..255 units); rounded device != host at '
        f'{np.mean(np.floor(out + 0.5) != host):.2e} of the values')
  assert diff.max() <= 1.0


def test_color_jitter_factor_one_is_exact_identity(jpegs):
  cfg = ops.ImageAugConfig(size=32, color_jitter=0.0, second_size=None)
  views = np.stack([ops.augment_for_device(np.random.default_rng(i), d, cfg)['image']
                    for i, d in enumerate(jpegs)]).astype(np.float32)
  views[0, 0, 0] = [0, 255, 128]
  order = np.array([[0, 1, 2], [2, 1, 0], [1, 2, 0], [1, 0, 2]], np.int32)
  out = jax.jit(dev.apply_color_jitter)(views, np.ones((4, 3), np.float32), order)
  np.testing.assert_array_equal(np.asarray(out), views)


# ----------------------------------------------------------------------------------------------
# Device tokenizer view and finish_images.


@pytest.mark.parametrize('size,tokenizer_size', [(224, 224), (224, 256)])
def test_device_views_close_to_host(jpegs, size, tokenizer_size):
  """The tokenizer view: the host reference's pixels, jittered on the device (within the host's
  rounding). The model view: the same pixels (a lanczos rather than bicubic resample of the
  crop) at equal sizes, else a bicubic resize of them; within 1/255 mean absolute difference."""
  cfg = ops.ImageAugConfig(size=size, second_size=tokenizer_size)
  host, device = [], []
  for data, seed in itertools.product(jpegs, range(2)):
    ref = ops.augment(np.random.default_rng(seed), ops.decode_pil(data), cfg)
    host.append({'image': ref['image'], 'tokenizer': ops.tokenizer_view(ref['tokenizer_image'])})
    device.append(ops.augment_for_device(np.random.default_rng(seed), data, cfg))
  host, batch = _stack(host), _stack(device)
  finish = jax.jit(lambda b: dev.finish_images(b, model_size=size,
                                               tokenizer_size=tokenizer_size))
  model, tok = (np.asarray(x) for x in finish(batch))
  assert model.shape == (8, size, size, 3) and model.dtype == np.float32
  assert tok.shape == (8, tokenizer_size, tokenizer_size, 3) and tok.dtype == np.float32
  assert tok.min() >= -1 and tok.max() <= 1
  # [-1, 1] scale: a difference d is d * 127.5 / 255 in [0, 1] pixel units.
  tok_err = np.abs(tok - host['tokenizer']) * 127.5
  model_err = np.abs(model - ops.normalize(host['image'])) * 127.5
  print(f'\nmodel {size}, tokenizer {tokenizer_size}: tokenizer view |device - host| max '
        f'{tok_err.max():.3f}/255; model view mean {model_err.mean():.3f}/255, max '
        f'{model_err.max():.1f}/255 ([0, 1] pixel units)')
  # Both round the jittered pixels; the reference's contrast mean is its model view's, so a few
  # values land on the other side of a rounding boundary.
  print(f'tokenizer view: {np.mean(tok_err > 0.5):.2e} of the values differ (by 1/255)')
  assert tok_err.max() <= 1.0 + 1e-4 and np.mean(tok_err > 0.5) < 1e-3
  assert model_err.mean() <= 1.0


def test_tokenizer_view_from_at_equal_size_is_tokenizer_view():
  x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  x[0, 0, 0] = [0, 255, 128]
  out = jax.jit(dev.tokenizer_view_from, static_argnums=1)(x.astype(np.float32), 16)
  np.testing.assert_array_equal(np.asarray(out), jax.jit(ops.tokenizer_view)(x))
  # XLA divides by a constant through its reciprocal: NumPy may differ in the last bit.
  np.testing.assert_allclose(np.asarray(out), ops.tokenizer_view(x), rtol=0, atol=1.2e-7)
  small = dev.tokenizer_view_from(x.astype(np.float32), 8)
  assert small.shape == (2, 8, 8, 3) and float(abs(small).max()) <= 1.0


def test_finish_images_without_jitter_is_normalize():
  x = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  x[0, 0, 0], x[0, 0, 1] = 0, 255
  tok = np.random.default_rng(2).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
  for mean, std in ((ops.BEIT3_MEAN, ops.BEIT3_STD), (ops.IMAGENET_MEAN, ops.IMAGENET_STD)):
    finish = jax.jit(lambda b, m=mean, s=std: dev.finish_images(b, mean=m, std=s))
    # Bit for bit what the train step computes today with image_ops.normalize under jit.
    expected = np.asarray(jax.jit(lambda x, m=mean, s=std: ops.normalize(x, m, s))(x))
    model, none = finish({'image': x})
    assert none is None
    np.testing.assert_array_equal(np.asarray(model), expected)
    # XLA divides by a constant through its reciprocal: NumPy may differ in the last bit.
    np.testing.assert_allclose(np.asarray(model), ops.normalize(x, mean, std), rtol=0,
                               atol=5e-7)
    # Unit factors (any order) are an exact identity.
    batch = {'image': x, 'jitter': np.ones((3, 3), np.float32),
             'jitter_order': np.array([[2, 0, 1]] * 3, np.int32)}
    model, _ = finish(batch)
    np.testing.assert_array_equal(np.asarray(model), expected)
  # The old layout: a host-made tokenizer view is used as is.
  model, view = jax.jit(dev.finish_images)({'image': x, 'tokenizer_image': tok})
  np.testing.assert_array_equal(np.asarray(view), jax.jit(ops.tokenizer_view)(tok))
  np.testing.assert_array_equal(np.asarray(model), jax.jit(ops.normalize)(x))
  with pytest.raises(ValueError, match='side'):
    dev.finish_images({'image': x, 'tokenizer_image': tok}, tokenizer_size=5)
  with pytest.raises(ValueError, match='together'):
    dev.finish_images({'image': x, 'jitter': np.ones((3, 3), np.float32)})
  with pytest.raises(TypeError):
    dev.finish_images({'image': x.astype(np.float32)})


# ----------------------------------------------------------------------------------------------
# JPEG draft decoding.


def test_draft_reduction():
  assert ops._draft_reduction(447, 1000, 224) == 1
  assert ops._draft_reduction(448, 448, 224) == 2
  assert ops._draft_reduction(1000, 895, 224) == 2
  assert ops._draft_reduction(900, 1200, 224) == 4
  assert ops._draft_reduction(1792, 1800, 224) == 8
  assert ops._draft_reduction(9000, 9000, 224) == 8


def test_draft_decode_is_reduced_and_close_to_full_decode(big_jpeg):
  cfg = ops.ImageAugConfig(size=224, scale=(0.9, 1.0), color_jitter=0.0, second_size=None)
  full = ops.decode_pil(big_jpeg)
  errs = []
  for seed in range(3):
    _, reduction = ops._decode_crop(np.random.default_rng(seed), big_jpeg, cfg)
    assert reduction == 4  # Crops of at least ~1400 px: 1400 / 4 >= 224 > 1400 / 8.
    out = ops.finish_on_host(ops.augment_for_device(np.random.default_rng(seed), big_jpeg, cfg))
    ref = ops.augment(np.random.default_rng(seed), full, cfg)['image']
    errs.append(np.abs(out.astype(np.float32) - ref).mean())
  print(f'\ndraft 1/4 decode vs full decode: mean |diff| = {max(errs):.3f}/255 (worst of 3)')
  assert max(errs) < 2.0
  # Halfway crops get a 1/2 decode; small crops a full one, equal to the host bit for bit.
  mid = ops.ImageAugConfig(size=224, scale=(0.2, 0.25), color_jitter=0.0, second_size=None)
  assert ops._decode_crop(np.random.default_rng(0), big_jpeg, mid)[1] == 2
  small = ops.ImageAugConfig(size=224, scale=(0.01, 0.02), color_jitter=0.0, second_size=None)
  assert ops._decode_crop(np.random.default_rng(0), big_jpeg, small)[1] == 1
  np.testing.assert_array_equal(
      ops.finish_on_host(ops.augment_for_device(np.random.default_rng(0), big_jpeg, small)),
      ops.augment(np.random.default_rng(0), full, small)['image'])


def test_non_jpeg_decodes_fully_and_corrupt_bytes_raise(big_jpeg):
  cfg = ops.ImageAugConfig(size=64, scale=(0.9, 1.0), second_size=None)
  png = _encode(_photo(300, 400, seed=3), 'PNG')
  assert ops._decode_crop(np.random.default_rng(0), png, cfg)[1] == 1
  out = ops.augment_for_device(np.random.default_rng(0), png, cfg)
  ref = ops.augment_for_device(np.random.default_rng(0), ops.decode_pil(png), cfg)
  np.testing.assert_array_equal(out['image'], ref['image'])
  for bad in (big_jpeg[:len(big_jpeg) // 2], big_jpeg[:300], b'garbage', png[:len(png) // 2]):
    with pytest.raises(ops.CorruptImageError):
      ops.augment_for_device(np.random.default_rng(0), bad, cfg)
  with pytest.raises(TypeError):
    ops._decode_crop(np.random.default_rng(0), 'not bytes', cfg)


# ----------------------------------------------------------------------------------------------
# What the visual tokenizer makes of the two views.


def test_a_trained_demo_tokenizer_gives_the_same_codes_for_device_and_host_views(eight_devices):
  """The demo visual tokenizer (configs/pretrain/tokenizer_demo.py, briefly trained here on
  scenes of the built-in world) encodes the device-made tokenizer view and the host reference
  view of the same crops with the same code on at least 99% of the patches."""
  import os

  from beit3_jax import sharding
  from beit3_jax.data import synthetic_world
  from beit3_jax.defaults import load_config_file
  from beit3_jax.jobs.tokenizer_training import _step_parts
  from beit3_jax.tokenizers import vqkd
  from beit3_jax.trainer import step as step_lib

  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                         'configs', 'pretrain', 'tokenizer_demo.py'))
  config.total_steps = 40
  size = config.tokenizer.input_size
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  objective, tx, schedule, _, _, _ = _step_parts(config, mesh)
  state, shardings = step_lib.create_state(objective, tx, mesh, jax.random.key(0), {}, {})
  rng = np.random.default_rng(0)
  scenes = [synthetic_world.render(synthetic_world.sample_scene(rng), size) for _ in range(256)]
  train_aug = ops.ImageAugConfig(size=size, scale=tuple(config.data.crop_scale),
                                 color_jitter=0.0, second_size=None)

  def batch(i):
    views = [ops.augment(np.random.default_rng([i, j]), scenes[(i * 32 + j) % 256],
                         train_aug)['image'] for j in range(32)]
    return jax.device_put({'image': {'image': np.stack(views)}}, sharding.batch_sharding(mesh))

  with sharding.use_mesh(mesh):
    first = batch(0)
    params, extra = jax.jit(objective.first_batch_init)(state.params, state.extra, {}, first)
    state = state.replace(params=params, extra=extra)
    step = step_lib.jit_train_step(step_lib.make_train_step(objective, tx, schedule), mesh,
                                   shardings, first)
    for i in range(config.total_steps):
      state, _ = step(state, batch(i), jax.random.key(i))

  aug = ops.ImageAugConfig(size=size, scale=(0.08, 1.0), color_jitter=0.4, second_size=size)
  host = _stack([ops.augment(np.random.default_rng([9, j]), scenes[j], aug)
                 for j in range(128)])
  device = _stack([ops.augment_for_device(np.random.default_rng([9, j]), scenes[j], aug)
                   for j in range(128)])
  _, device_views = jax.jit(lambda b: dev.finish_images(b, tokenizer_size=size))(device)
  encode = jax.jit(lambda x: vqkd.VQKD(config.tokenizer).apply(
      {'params': state.params}, x, method=vqkd.VQKD.encode))
  codes_host = np.asarray(encode(ops.tokenizer_view(host['tokenizer_image'])))
  codes_device = np.asarray(encode(device_views))
  used = len(np.unique(codes_host))
  agree = float(np.mean(codes_host == codes_device))
  print(f'demo tokenizer: {agree:.2%} of {codes_host.size} patch codes agree ({used} codes used)')
  assert used >= 16   # a tokenizer that separates colours, not a collapsed one
  assert agree >= 0.99
