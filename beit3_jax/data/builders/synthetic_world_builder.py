"""TFDS builders of the synthetic world (`beit3_jax.data.synthetic_world`), rendered locally.

Design: one builder per *example layout*, not one per task, because the layouts differ (one
image, two images, no image) while several tasks share a layout:

- `SyntheticWorld` ('beit3_synthetic_world'): image, captions, label, qa, objects, index. The
  source of image and image-text pretraining, classification, VQA, retrieval and captioning.
- `SyntheticWorldNlvr2` ('beit3_synthetic_world_nlvr2'): image_a, image_b, statement, label,
  index. NLVR2.
- `SyntheticWorldText` ('beit3_synthetic_world_text'): text, index. Text-only pretraining
  (masked language modelling) and training the demo .spm.

Configs: the image builders have '64px' and '224px'; the text builder has 'default'. Each config
carries its split sizes and seed (`SyntheticWorldConfig`). `prepare(num_examples=...)` makes a
custom config named after its sizes (e.g. '64px_16_4_4') for tests and quick runs; a prepared
custom config is read back from its files like any other. A split of size 0 is not written.

Build time of the defaults (64 px; 4000/500/500 images, 8000/250/250 NLVR2 pairs,
20000/1000/1000 sentences) on one core: about 16 s + 35 s + 4 s, 155 MB. At 224 px an image
example takes ~33 ms and ~80 KB (the pixel noise does not compress), an NLVR2 pair ~52 ms: the
defaults take ~10 min and ~1.8 GB.

Features, as read back by `tfds.data_source` (numpy, no TensorFlow; text comes back as bytes,
and a Sequence as a Python list):

- image, image_a, image_b: uint8 (S, S, 3) arrays, stored as PNG.
- captions: list of C bytes, C = `num_captions` (5) true descriptions of the image.
- label: int, index into `synthetic_world.LABEL_NAMES` (the largest object's colour); in NLVR2,
  1 = the statement is true of the pair (left = image_a, right = image_b).
- qa: {'question': list of Q bytes, 'answer': list of Q bytes, 'answer_id': list of Q int64
  indices into `synthetic_world.ANSWERS`}, Q = `num_questions` (4).
- objects: {'shape', 'colour', 'size': lists of K int64 indices into SHAPES / COLOUR_NAMES /
  SIZE_NAMES, 'position': list of K float32 (2,) arrays, the centre (x from the left, y from
  the top) in units of the image side}, K = 1..3 objects: the scene's ground truth.
- index: int, the example's index in its split (record i of a split is example i).
- statement (NLVR2), text (text corpus; the same field name as `local_files.build_text`): bytes.

Determinism: example i of split s is generated from
`synthetic_world.example_rng(seed, family, split_id, i)` (family 0 images, 1 NLVR2, 2 text;
split_id 0 train, 1 validation, 2 test), so any example can be regenerated on its own, and the
splits and families never share a random stream.

Usage:

    builders = prepare(data_dir=None, image_size=64)   # builds once into paths.tfds_dir()
    source = builders['images'].as_data_source('train')
    # or, in another process, without importing this module:
    source = tfds.data_source('beit3_synthetic_world/64px', split='train',
                              data_dir=paths.tfds_dir(), download=False)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import paths
from beit3_jax.data import synthetic_world as sw

SPLITS = ('train', 'validation', 'test')
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
DEFAULT_SEED = 0
_VERSION = tfds.core.Version('1.3.0')
_RELEASE_NOTES = {'1.0.0': 'First release.',
                  '1.1.0': "label: the largest object's colour (ties: topmost), was its shape.",
                  '1.2.0': "qa: also the readout kinds (the large object's colour and shape, "
                           'the number of objects); images and captions unchanged.',
                  '1.3.0': 'nlvr2: threshold statements (synthetic_world.NLVR2_THRESHOLD_KINDS, '
                           'e.g. "there are at least four objects in total"), labels alternating '
                           'true/false, 8000 training pairs; the other builders unchanged.'}


@dataclasses.dataclass(eq=False)
class SyntheticWorldConfig(tfds.core.BuilderConfig):
  """A config: image size (px; unused by the text builder), split sizes, seed, and how much text
  each example carries."""
  image_size: int = 64
  num_train: int = 4000
  num_validation: int = 500
  num_test: int = 500
  seed: int = DEFAULT_SEED
  max_objects: int = sw.MAX_OBJECTS
  num_captions: int = 5
  num_questions: int = 4

  @property
  def split_sizes(self) -> dict[str, int]:
    return {'train': self.num_train, 'validation': self.num_validation, 'test': self.num_test}


def _image_feature(size: int) -> tfds.features.Image:
  return tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='png')


def _pil(pixels: np.ndarray) -> Image.Image:
  """TFDS encodes a PIL image with PIL; a numpy image would need TensorFlow."""
  return Image.fromarray(pixels)


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Generates `num_<split>` examples per split, example i from its own random stream."""
  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  FAMILY: int = -1  # a key of the random streams, distinct per builder

  def _example(self, rng: np.random.Generator, index: int) -> dict:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, n)  # TFDS cannot write an empty split
            for split, n in self.builder_config.split_sizes.items() if n > 0}

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
    seed = self.builder_config.seed
    for i in range(num_examples):
      yield i, self._example(sw.example_rng(seed, self.FAMILY, _SPLIT_IDS[split], i), i)


class SyntheticWorld(_SyntheticBuilder):
  """Scenes: an image with true captions, a class label, questions with answers, and the
  objects' ground truth."""
  name = 'beit3_synthetic_world'
  FAMILY = 0
  BUILDER_CONFIGS = [
      SyntheticWorldConfig(name='64px', image_size=64, description='64x64 images.'),
      SyntheticWorldConfig(name='224px', image_size=224, description='224x224 images.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image': _image_feature(cfg.image_size),
            'captions': tfds.features.Sequence(text, length=cfg.num_captions),
            'label': tfds.features.ClassLabel(names=sw.LABEL_NAMES),
            'qa': tfds.features.Sequence({
                'question': text, 'answer': text,
                'answer_id': tfds.features.ClassLabel(names=sw.ANSWERS)},
                length=cfg.num_questions),
            'objects': tfds.features.Sequence({
                'shape': tfds.features.ClassLabel(names=sw.SHAPES),
                'colour': tfds.features.ClassLabel(names=sw.COLOUR_NAMES),
                'size': tfds.features.ClassLabel(names=sw.SIZE_NAMES),
                'position': tfds.features.Tensor(shape=(2,), dtype=np.float32)}),
            'index': tfds.features.Scalar(np.int64),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True)

  def _example(self, rng, index):
    cfg = self.builder_config
    scene = sw.sample_scene(rng, cfg.max_objects)  # then captions, then questions, from rng
    captions = sw.captions(scene, rng, cfg.num_captions)
    qas = sw.questions(scene, rng, cfg.num_questions)
    return {
        'image': _pil(sw.render(scene, cfg.image_size)),
        'captions': captions,
        'label': sw.label(scene),
        'qa': {'question': [q for q, _ in qas], 'answer': [a for _, a in qas],
               'answer_id': [a for _, a in qas]},
        'objects': {'shape': [o.shape for o in scene.objects],
                    'colour': [o.colour for o in scene.objects],
                    'size': [o.size for o in scene.objects],
                    'position': np.array([(o.x, o.y) for o in scene.objects], np.float32)},
        'index': index,
    }


class SyntheticWorldNlvr2(_SyntheticBuilder):
  """Pairs of scenes with a statement about both (`synthetic_world.NLVR2_KINDS`), true of the
  even-numbered examples of every split and false of the odd ones."""
  name = 'beit3_synthetic_world_nlvr2'
  FAMILY = 1
  BUILDER_CONFIGS = [
      SyntheticWorldConfig(name='64px', image_size=64, num_train=8000, num_validation=250,
                           num_test=250, description='64x64 images.'),
      SyntheticWorldConfig(name='224px', image_size=224, num_train=8000, num_validation=250,
                           num_test=250, description='224x224 images.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image_a': _image_feature(size),
            'image_b': _image_feature(size),
            'statement': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=('false', 'true')),
            'index': tfds.features.Scalar(np.int64),
        }),
        disable_shuffling=True)

  def _example(self, rng, index):
    cfg = self.builder_config
    # Alternate labels: every split is balanced, so its majority class scores 50%.
    image_a, image_b, statement, truth = sw.nlvr2_example(rng, cfg.image_size, cfg.max_objects,
                                                          truth=index % 2 == 0)
    return {'image_a': _pil(image_a), 'image_b': _pil(image_b), 'statement': statement,
            'label': int(truth), 'index': index}


class SyntheticWorldText(_SyntheticBuilder):
  """Text-only sentences about the world: captions of unseen scenes, questions with answers,
  facts about colours, shapes and numbers."""
  name = 'beit3_synthetic_world_text'
  FAMILY = 2
  BUILDER_CONFIGS = [
      SyntheticWorldConfig(name='default', num_train=20000, num_validation=1000, num_test=1000,
                           description='One sentence an example.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'index': tfds.features.Scalar(np.int64),
        }),
        disable_shuffling=True)

  def _example(self, rng, index):
    return {'text': sw.text_corpus_sentence(rng), 'index': index}


BUILDERS: dict[str, type[_SyntheticBuilder]] = {
    'images': SyntheticWorld, 'nlvr2': SyntheticWorldNlvr2, 'text': SyntheticWorldText}


def make_config(which: str, image_size: int = 64, num_examples: Mapping[str, int] | None = None,
                seed: int = DEFAULT_SEED) -> SyntheticWorldConfig:
  """The config `prepare` builds: a registered one ('64px', '224px', 'default') when nothing is
  overridden, else a custom one named after what differs, e.g. '64px_16_4_4_seed3'.

  Args:
    which: 'images', 'nlvr2' or 'text'.
    image_size: image side in px (ignored for 'text').
    num_examples: split sizes overriding the defaults, e.g. {'train': 16, 'validation': 4,
      'test': 4}; splits not given keep their default size.
    seed: the random seed of the whole data set.
  """
  if which not in BUILDERS:
    raise ValueError(f'Unknown synthetic world data set {which!r}; expected one of '
                     f'{list(BUILDERS)}.')
  unknown = set(num_examples or {}) - set(SPLITS)
  if unknown:
    raise ValueError(f'Unknown splits {sorted(unknown)} in num_examples; expected {SPLITS}.')
  if any(int(n) < 0 for n in (num_examples or {}).values()):
    raise ValueError(f'Split sizes must be >= 0 (0: no such split), got {dict(num_examples)}.')
  configs = BUILDERS[which].builder_configs
  base = 'default' if which == 'text' else f'{image_size}px'
  if base in configs and not num_examples and seed == DEFAULT_SEED:
    return configs[base]
  template = configs['default' if which == 'text' else '64px']
  sizes = {**template.split_sizes, **{k: int(v) for k, v in (num_examples or {}).items()}}
  name = base + ''.join(f'_{sizes[s]}' for s in SPLITS) * bool(num_examples)
  name += f'_seed{seed}' if seed != DEFAULT_SEED else ''
  return dataclasses.replace(
      template, name=name, image_size=image_size, seed=seed, num_train=sizes['train'],
      num_validation=sizes['validation'], num_test=sizes['test'],
      description=f'Custom: {image_size} px, splits {sizes}, seed {seed}.')


def dataset_name(which: str, image_size: int = 64, num_examples: Mapping[str, int] | None = None,
                 seed: int = DEFAULT_SEED) -> str:
  """'name/config' for `tfds.data_source`, e.g. 'beit3_synthetic_world/64px'."""
  config = make_config(which, image_size, num_examples, seed)
  return f'{BUILDERS[which].name}/{config.name}'


def prepare(data_dir: str | None = None, image_size: int = 64,
            which: Sequence[str] = ('images', 'nlvr2', 'text'),
            num_examples: Mapping[str, int] | None = None,
            seed: int = DEFAULT_SEED) -> dict[str, tfds.core.DatasetBuilder]:
  """Builds the synthetic world data sets once, into `paths.tfds_dir(data_dir)`, and reuses them.

  Generation is local (nothing is downloaded); the files are array_record, readable without
  TensorFlow. Prints what it builds or reuses, and where.

  Args:
    data_dir: the project data dir (None: the default, see `beit3_jax.data.paths`).
    image_size: image side in px.
    which: any of 'images', 'nlvr2', 'text'.
    num_examples: split sizes overriding the defaults (see `make_config`), e.g. for tests.
    seed: the random seed of the data sets.

  Returns:
    {which: prepared builder}; e.g. `prepare()['images'].as_data_source('train')`.
  """
  if isinstance(which, str):
    which = (which,)
  root = paths.tfds_dir(data_dir)
  configs = {w: make_config(w, image_size, num_examples, seed) for w in which}  # check all first
  builders = {}
  for w, config in configs.items():
    builder = BUILDERS[w](config=config, data_dir=root, file_format='array_record')
    what = f'{builder.name}/{config.name}'
    if builder.is_prepared():
      print(f'Reusing {what} at {builder.data_dir}')
    else:
      print(f'Building {what} ({config.split_sizes}) into {builder.data_dir} ...', flush=True)
      started = time.perf_counter()
      tfds.disable_progress_bar()  # one line per data set (above and below) is enough
      builder.download_and_prepare(file_format='array_record')
      print(f'Built {what} in {time.perf_counter() - started:.1f} s')
    builders[w] = builder
  return builders
