"""Tests of unilm's fine-tuning augmentations (beit3_jax/data/augment.py) and their wiring.

The fixture tests/fixtures/augment_reference.npz holds, for one uint8 (24, 32, 3) image, the
output of every op of unilm's beit3/randaug.py (OpenCV 4.8.1) and of timm 0.6.13's RandAugment
at fixed magnitudes and sign draws, and timm RandomErasing runs with scripted draws (its
'meta' entry names the sources).
"""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit3_jax.data import augment, image_ops
from beit3_jax.data import finetuning as inputs_lib
from beit3_jax import tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
_FIXTURE = np.load(ROOT / 'tests' / 'fixtures' / 'augment_reference.npz')
IMAGE = _FIXTURE['image']
META = json.loads(str(_FIXTURE['meta']))
UNILM_KEYS = sorted(k for k in _FIXTURE.files if k.startswith('unilm/'))
TIMM_KEYS = sorted(k for k in _FIXTURE.files if k.startswith('timm/'))


def _case(key):
  _, name, m, sign = key.split('/')
  return name, float(m[1:]), sign == 'neg'


def test_fixture_covers_every_op():
  assert {_case(k)[0] for k in UNILM_KEYS} == set(augment.UNILM_OPS)
  assert {_case(k)[0] for k in TIMM_KEYS} == set(augment.TIMM_OPS + augment.TIMM_INCREASING_OPS)
  assert 'randaug.py' in META['source']['unilm'] and 'timm 0.6.13' in META['source']['timm']


@pytest.mark.parametrize('key', UNILM_KEYS)
def test_unilm_op_equals_randaug(key):
  name, m, neg = _case(key)
  out = augment.apply_unilm_op(IMAGE, name, *augment.unilm_op_args(name, m, neg))
  assert out.dtype == np.uint8 and out.shape == IMAGE.shape
  np.testing.assert_array_equal(out, _FIXTURE[key])   # exact: no tolerance needed


@pytest.mark.parametrize('key', TIMM_KEYS)
def test_timm_op_equals_timm(key):
  name, m, neg = _case(key)
  out = augment.apply_timm_op(IMAGE, name, *augment.timm_op_args(name, m, neg),
                              fill=tuple(META['timm_fill']), interpolation='bicubic')
  np.testing.assert_array_equal(out, _FIXTURE[key])


def test_timm_posterize_to_zero_bits_is_black():
  # timm's PosterizeIncreasing at magnitude 10 keeps 0 bits; Pillow < 10 gave black, newer
  # Pillow refuses it (META['timm_refused']).
  assert any('PosterizeIncreasing/m10' in r for r in META['timm_refused'])
  args = augment.timm_op_args('PosterizeIncreasing', 10.0)
  assert args == (0,)
  assert not augment.apply_timm_op(IMAGE, 'PosterizeIncreasing', *args).any()


def test_magnitude_mappings():
  assert augment.unilm_op_args('Rotate', 7, negate=True) == (-21.0, 128)
  assert augment.unilm_op_args('TranslateX', 7) == (7.0, 128)
  assert augment.unilm_op_args('Brightness', 7) == pytest.approx((1.36,))
  assert augment.timm_op_args('TranslateXRel', 9, negate=True) == pytest.approx((-0.405,))
  assert augment.timm_op_args('BrightnessIncreasing', 9, negate=True) == pytest.approx((0.19,))
  assert augment.timm_op_args('SolarizeIncreasing', 9) == (256 - 230,)
  assert augment.mean_fill(image_ops.IMAGENET_MEAN) == tuple(META['timm_fill']) == (124, 116, 104)


@pytest.mark.parametrize('spec', sorted(META['timm_parsed']))
def test_parse_rand_augment_equals_timm(spec):
  want = META['timm_parsed'][spec]
  got = augment.parse_rand_augment(spec)
  assert list(got.ops) == want['ops']
  assert got.num_layers == want['num_layers'] and got.magnitude == want['magnitude']
  assert got.magnitude_std == want['magnitude_std'] and got.prob == want['prob']
  assert got.magnitude_max == (want['magnitude_max'] or 10)
  if want['weights'] is None:
    assert got.choice_weights is None
  else:
    np.testing.assert_allclose(got.choice_weights, want['weights'], rtol=1e-12)


@pytest.mark.parametrize('spec', ['rand-m9-foo1', 'randm9', 'augmix-m5', 'rand-m', 'rand-w1',
                                  'rand-mx', 'rand-n0', 'unilm-x3', 'unilm-m11', 'v0', 'rand-n2.5'])
def test_bad_rand_augment_strings_name_the_field(spec):
  with pytest.raises(ValueError, match='data.rand_augment'):
    augment.make_augmenter(spec)
  with pytest.raises(ValueError, match='data.rand_augment'):
    inputs_lib.FinetuneInputs(image_size=16, train=True, rand_augment=spec)


def test_make_augmenter():
  assert augment.make_augmenter('') is None
  unilm = augment.make_augmenter('unilm')
  assert unilm == augment.RandomAugment(2, 7.0, augment.UNILM_VL_OPS, 0.5, 128)
  assert augment.make_augmenter('unilm-n3-m5') == augment.RandomAugment(3, 5.0)
  timm = augment.make_augmenter('rand-m9-mstd0.5-inc1', (124, 116, 104))
  assert isinstance(timm, augment.TimmRandAugment) and timm.fill == (124, 116, 104)


def _image(seed=0, h=16, w=20):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize('aug', [augment.RandomAugment(),
                                 augment.parse_rand_augment('rand-m9-mstd0.5-inc1')])
def test_composed_augmenter_is_deterministic_and_applies_its_draws(aug):
  img = _image()
  a = aug(np.random.default_rng(5), img)
  b = aug(np.random.default_rng(5), img)
  np.testing.assert_array_equal(a, b)
  draws = aug.draw(np.random.default_rng(5))
  n = aug.num_ops if isinstance(aug, augment.RandomAugment) else aug.num_layers
  assert len(draws) == n == 2
  np.testing.assert_array_equal(aug.apply(img, draws), a)
  # Applied ops one by one give the same image; unapplied ones change nothing.
  want = img
  for name, applied, negate, m in draws:
    if applied:
      want = (augment.apply_unilm_op(want, name, *augment.unilm_op_args(name, m, negate))
              if isinstance(aug, augment.RandomAugment) else
              augment.apply_timm_op(want, name, *augment.timm_op_args(name, m, negate)))
  np.testing.assert_array_equal(want, a)
  assert not np.array_equal(aug(np.random.default_rng(6), img), a) or \
      not np.array_equal(aug(np.random.default_rng(7), img), a)


def test_draw_statistics():
  rng = np.random.default_rng(0)
  unilm = augment.RandomAugment()
  draws = [d for _ in range(3000) for d in unilm.draw(rng)]
  assert len(draws) == 6000
  assert abs(np.mean([d[1] for d in draws]) - 0.5) < 0.03            # p 0.5 per op
  counts = np.array([sum(d[0] == op for d in draws) for op in augment.UNILM_VL_OPS])
  assert counts.min() > 450 and counts.max() < 750                   # uniform over 10 ops
  signed = [d[2] for d in draws if d[1] and d[0] in ('Rotate', 'ShearX', 'TranslateY')]
  assert abs(np.mean(signed) - 0.5) < 0.06
  assert {d[3] for d in draws} == {7.0}
  timm = augment.parse_rand_augment('rand-m9-mstd0.5-inc1')
  draws = [d for _ in range(3000) for d in timm.draw(rng)]
  mags = np.array([d[3] for d in draws if d[1]])
  assert abs(mags.mean() - 8.99) < 0.04 and abs(mags.std() - 0.5) < 0.04 and mags.max() == 10
  assert {d[0] for d in draws} == set(augment.TIMM_INCREASING_OPS)
  assert {d[3] for d in draws if not d[1]} == {9.0}


class _Scripted:
  """A stand-in np.random.Generator that returns given values and records the calls."""

  def __init__(self, random=(), uniform=(), integers=()):
    self._r, self._u, self._i = iter(random), iter(uniform), iter(integers)
    self.calls = {'uniform': [], 'randint': []}

  def random(self):
    return next(self._r)

  def uniform(self, low, high):
    v = next(self._u)
    self.calls['uniform'].append([low, high, v])
    return v

  def integers(self, low, high):
    v = next(self._i)
    self.calls['randint'].append([low, high - 1, v])   # timm's randint is inclusive
    return v


@pytest.mark.parametrize('i', range(3))
def test_random_erasing_equals_timm(i):
  case = META['erasing'][i]
  script = case['script']
  rng = _Scripted(script['random'], script['uniform'], script['randint'])
  eraser = augment.RandomErasing(0.25, 'pixel', 1)
  boxes = eraser.boxes(rng, 24, 32)
  for kind in ('uniform', 'randint'):
    np.testing.assert_allclose(rng.calls[kind], case['calls'][kind], rtol=1e-12)
  if 'box' not in script:
    assert boxes == []
    return
  assert boxes == [tuple(script['box'])]
  mean, std = np.float32(image_ops.IMAGENET_MEAN), np.float32(image_ops.IMAGENET_STD)
  normalised = (IMAGE.astype(np.float32) / 255 - mean) / std
  patch = _FIXTURE[f'erase/{i}/patch']
  out = augment.erase(normalised, boxes, [patch])
  top, left, h, w = boxes[0]
  np.testing.assert_array_equal(out[top:top + h, left:left + w], patch)
  out[top:top + h, left:left + w] = normalised[top:top + h, left:left + w]
  np.testing.assert_array_equal(out, normalised)
  # The host sampler draws per-pixel N(0, 1) noise of the box's shape.
  values = eraser.values(np.random.default_rng(0), boxes[0], 3)
  assert values.shape == (h, w, 3) and values.dtype == np.float32


def test_random_erasing_checks_its_fields():
  with pytest.raises(ValueError, match='data.random_erasing_mode'):
    augment.RandomErasing(mode='noise')
  with pytest.raises(ValueError, match='data.random_erasing='):
    augment.RandomErasing(prob=1.5)
  with pytest.raises(ValueError, match='data.random_erasing_count'):
    augment.RandomErasing(max_count=0)


def test_erase_on_device_matches_timm_sampler():
  b, h, w = 2048, 12, 16
  images = jnp.full((b, h, w, 3), 5.0, jnp.float32)
  cfg = augment.RandomErasing(prob=0.25, mode='pixel')
  out = np.asarray(jax.jit(augment.erase_on_device, static_argnums=2)(
      images, jax.random.PRNGKey(0), cfg))
  erased = np.all(out != 5.0, axis=-1)                   # (B, H, W)
  assert np.all(erased | np.all(out == 5.0, axis=-1))    # the rest untouched
  areas = erased.sum(axis=(1, 2))
  assert abs(np.mean(areas > 0) - 0.25) < 0.03
  for m in erased[areas > 0]:                            # one rectangle of the allowed shapes
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert m.sum() == len(rows) * len(cols)
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    assert len(rows) < h and len(cols) < w
  host = augment.RandomErasing(prob=1.0)
  rng = np.random.default_rng(0)
  host_areas = [sum(bh * bw for _, _, bh, bw in host.boxes(rng, h, w)) for _ in range(4000)]
  assert abs(areas[areas > 0].mean() - np.mean(host_areas)) < 0.06 * np.mean(host_areas)
  # 'pixel': N(0, 1) per pixel and channel in the erased boxes.
  noise = out[erased]
  assert noise.size > 3000 and abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  off = augment.RandomErasing(prob=0.0)
  assert augment.erase_on_device(images, jax.random.PRNGKey(0), off) is images


def _load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / 'finetune' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name,rand_augment,erasing', [
    ('classification_base', 'rand-m9-mstd0.5-inc1', 0.25),
    ('classification_large', 'rand-m9-mstd0.5-inc1', 0.25),
    ('vqa_base', 'unilm', 0.0), ('captioning_large', 'unilm', 0.0),
    ('nlvr2_base', '', 0.0), ('retrieval_large', '', 0.0)])
def test_recipes_set_unilm_augmentations(name, rand_augment, erasing):
  config = _load_config(name)
  assert config.data.rand_augment == rand_augment
  assert config.data.random_erasing == erasing
  assert config.data.random_erasing_mode == 'pixel' and config.data.random_erasing_count == 1
  objective_erasing = inputs_lib.random_erasing(config)
  assert (objective_erasing is None) == (erasing == 0)


@pytest.mark.parametrize('task', ['classification', 'vqa', 'captioning', 'retrieval', 'nlvr2'])
def test_demos_keep_augmentation_off(task):
  config = _load_config(f'{task}_demo')
  assert config.data.rand_augment == '' and config.data.random_erasing == 0.0
  inputs = inputs_lib.FinetuneInputs.from_config(config, train=True)
  img = _image(3, 40, 48)
  rng = np.random.default_rng(9)
  crop = image_ops.random_resized_crop(rng, img, inputs.image_size, inputs.crop_scale,
                                       interpolation='bicubic')
  want = image_ops.horizontal_flip(rng, crop, inputs.flip_prob)
  np.testing.assert_array_equal(inputs_lib.view(inputs, img, np.random.default_rng(9)), want)


@pytest.mark.parametrize('name', ['classification_base', 'vqa_base'])
def test_recipe_augments_training_views_only(name):
  config = _load_config(name)
  config.model.img_size = 16
  img = _image(4, 30, 36)
  train = inputs_lib.FinetuneInputs.from_config(config, train=True)
  plain = dataclasses.replace(train, rand_augment='')
  aug = train.augmenter()
  assert aug is not None
  differs = 0
  for seed in range(6):
    out = inputs_lib.view(train, img, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    base_view = inputs_lib.view(plain, img, rng)      # the same crop and flip draws
    np.testing.assert_array_equal(out, aug(rng, base_view))
    differs += not np.array_equal(out, base_view)
  assert differs >= 2
  evaluation = inputs_lib.FinetuneInputs.from_config(config, train=False)
  want = image_ops.eval_view(img, 16, float(config.data.eval_crop_pct), 'bicubic')
  for seed in range(3):
    np.testing.assert_array_equal(inputs_lib.view(evaluation, img, np.random.default_rng(seed)),
                                  want)


def test_classification_objective_erases_training_images_only():
  config = _load_config('classification_base')
  objective = tasks.get('classification').objective(config)
  assert objective.erasing == augment.RandomErasing(0.25, 'pixel', 1)
  demo = tasks.get('classification').objective(_load_config('classification_demo'))
  assert demo.erasing is None


def test_erasing_config_errors():
  config = _load_config('vqa_demo')
  config.data.random_erasing = 0.25
  from beit3_jax import tasks
  from beit3_jax.tasks import base
  with pytest.raises(ValueError, match="data.random_erasing=0.25: task 'vqa' does not erase"):
    base.random_erasing(tasks.get('vqa'), config)
  config = _load_config('classification_demo')
  config.data.random_erasing = 0.25
  config.data.random_erasing_count = 0
  with pytest.raises(ValueError, match='data.random_erasing_count'):
    inputs_lib.random_erasing(config)
  config.data.random_erasing_count = 1
  config.data.random_erasing_mode = 'noise'
  with pytest.raises(ValueError, match='data.random_erasing_mode'):
    inputs_lib.random_erasing(config)
