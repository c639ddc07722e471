"""TFDS builders of COCO and Flickr30k captions with Karpathy's splits, from files in a manual dir.

The builders read the official files that the user has already downloaded. They never download
anything. Retrieval and captioning fine-tuning use them.

- `Beit3CocoKarpathy` ('beit3_coco_karpathy'): 113,287 / 5,000 / 5,000 images
  (train / validation / test).
- `Beit3Flickr30kKarpathy` ('beit3_flickr30k_karpathy'): about 29k / 1k / 1k images.

Manual dir layout (pass the folder as TFDS's standard `manual_dir`, see Usage):

    COCO:                                   Flickr30k:
    <manual_dir>/                           <manual_dir>/
      dataset_coco.json                       dataset_flickr30k.json
      train2014/COCO_train2014_*.jpg          flickr30k-images/<imgid>.jpg
      val2014/COCO_val2014_*.jpg

Where to get the files:

- `dataset_coco.json` and `dataset_flickr30k.json` are Karpathy's split files, in
  `caption_datasets.zip` from https://cs.stanford.edu/people/karpathy/deepimagesent/ .
- COCO images: `train2014.zip` and `val2014.zip` from https://cocodataset.org/#download
  (http://images.cocodataset.org/zips/train2014.zip, .../val2014.zip). Unzip them so that
  `train2014/` and `val2014/` sit next to the JSON. Karpathy's splits draw on both folders: each
  image entry's `filepath` names its folder.
- Flickr30k images: `flickr30k-images.tar.gz`, which you get through the request form at
  https://shannon.cs.illinois.edu/DenotationGraph/ . Extract it next to the JSON.

Karpathy's JSON format: {"images": [{"filepath": "val2014" (COCO only), "filename":
"COCO_val2014_000000391895.jpg", "imgid": 0, "split": "train"|"restval"|"val"|"test",
"cocoid": 391895 (COCO only), "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]}, ...]}.

Splits: train = Karpathy's 'train' + 'restval' (as unilm's BEiT-3 does for COCO; Flickr30k has
no 'restval'). validation = 'val'. test = 'test'. Within a split, images keep the order of the
JSON file.

Features, as `tfds.data_source` reads them back (numpy, no TensorFlow; text comes back as bytes):

- image_bytes: the image file's original encoded bytes (JPEG). The input pipeline decodes them.
- captions: list of bytes, the image's 'raw' sentences, stripped. Empty sentences are dropped.
  There are usually 5 (some COCO images have 6 or 7).
- image_id: int. The `cocoid` for COCO, the `imgid` for Flickr30k.
- filename: bytes, the image's file name, e.g. b'COCO_val2014_000000391895.jpg'.
- index: int, the example's position in its split: record i of a split is example i. Retrieval
  uses it to map captions to images.

Before anything is written, the build checks every image file. A missing JSON or image file
raises `ManualFileError` (a FileNotFoundError). Its message names the missing path and the
expected layout. A malformed JSON raises `KarpathyFormatError`, naming file:line for invalid
JSON, or the file and entry (`images[i]`) for a missing field.

Usage:

    from beit3_jax.data.builders import karpathy_captions
    builder = karpathy_captions.prepare('coco', manual_dir='/data/coco', data_dir=None)
    source = builder.as_data_source('test')
    # or, in another process, without importing this module:
    source = tfds.data_source('beit3_coco_karpathy', split='test',
                              data_dir=paths.tfds_dir(), download=False)
    # or beit3_jax.data.tfds_sources.open_source('beit3_coco_karpathy', 'test')

The same works with plain TFDS (`tfds build` needs the module to be importable):

    builder = karpathy_captions.Beit3CocoKarpathy(data_dir=..., file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir='/data/coco'))
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from beit3_jax.data import local_files, paths

SPLITS = {'train': ('train', 'restval'), 'validation': ('val',), 'test': ('test',)}
_KARPATHY_SPLITS = frozenset(s for parts in SPLITS.values() for s in parts)


class ManualFileError(FileNotFoundError):
  """A file that should be in the manual dir is missing. The message names it and the layout."""


class KarpathyFormatError(ValueError):
  """A malformed Karpathy split file. The message names the file and line or entry."""


_COCO_LAYOUT = """\
Expected manual dir layout (see beit3_jax.data.builders.karpathy_captions):
  <manual_dir>/dataset_coco.json    Karpathy's split file (caption_datasets.zip from
                                    https://cs.stanford.edu/people/karpathy/deepimagesent/)
  <manual_dir>/train2014/*.jpg      COCO train2014 images (https://cocodataset.org/#download)
  <manual_dir>/val2014/*.jpg        COCO val2014 images"""

_FLICKR_LAYOUT = """\
Expected manual dir layout (see beit3_jax.data.builders.karpathy_captions):
  <manual_dir>/dataset_flickr30k.json    Karpathy's split file (caption_datasets.zip from
                                         https://cs.stanford.edu/people/karpathy/deepimagesent/)
  <manual_dir>/flickr30k-images/*.jpg    Flickr30k images (flickr30k-images.tar.gz, by request
                                         at https://shannon.cs.illinois.edu/DenotationGraph/)"""


def read_karpathy_json(path: epath.Path, layout: str = '') -> list[dict]:
  """The `images` entries of a Karpathy split file. Raises a clear error if it is missing or
  malformed."""
  path = epath.Path(path)
  if not path.is_file():
    raise ManualFileError(f'No Karpathy split file at {path}.\n{layout}')
  text = path.read_text(encoding='utf-8')
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise KarpathyFormatError(f'{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}).') from e
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise KarpathyFormatError(f'{path}: expected a JSON object with an "images" list '
                              '(Karpathy\'s split file format).')
  return data['images']


def _field(entry, key: str, where: str, types_=None):
  if not isinstance(entry, dict):
    raise KarpathyFormatError(f'{where}: expected a JSON object, got {type(entry).__name__}.')
  if key not in entry:
    raise KarpathyFormatError(f'{where}: no {key!r} field; got {sorted(entry)}.')
  value = entry[key]
  if types_ is not None and not isinstance(value, types_):
    raise KarpathyFormatError(f'{where}: {key!r} should be {types_}, got {value!r}.')
  return value


class _KarpathyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Images with their captions, in Karpathy's splits, read from a manual dir."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  JSON_NAME: str = ''
  ID_KEY: str = ''
  LAYOUT: str = ''

  def _image_path(self, manual: epath.Path, entry: dict, where: str) -> epath.Path:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image_bytes': tfds.features.Tensor(shape=(), dtype=np.object_),
            'captions': tfds.features.Sequence(tfds.features.Text()),
            'image_id': tfds.features.Scalar(np.int64),
            'filename': tfds.features.Text(),
            'index': tfds.features.Scalar(np.int64),
        }),
        disable_shuffling=True,
        homepage='https://cs.stanford.edu/people/karpathy/deepimagesent/')

  def _manual_dir(self, dl_manager) -> epath.Path:
    try:
      return dl_manager.manual_dir
    except AssertionError as e:  # not given, missing or empty
      raise ManualFileError(
          f'{self.name} needs its files in a manual dir ({e}). Pass it with '
          'download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR)) '
          f'or karpathy_captions.prepare(..., manual_dir=DIR).\n{self.LAYOUT}') from e

  def _read_entries(self, manual: epath.Path) -> dict[str, list[dict]]:
    """{split: [example without image_bytes and index]}. Checks every field and image file."""
    json_path = manual / self.JSON_NAME
    images = read_karpathy_json(json_path, self.LAYOUT)
    by_split = {s: [] for s in SPLITS}
    split_of = {part: split for split, parts in SPLITS.items() for part in parts}
    missing = []
    for i, entry in enumerate(images):
      where = f'{json_path}: images[{i}]'
      split = _field(entry, 'split', where, str)
      if split not in _KARPATHY_SPLITS:
        raise KarpathyFormatError(f'{where}: unknown split {split!r}; expected one of '
                                  f'{sorted(_KARPATHY_SPLITS)}.')
      sentences = _field(entry, 'sentences', where, list)
      captions = [str(_field(s, 'raw', f'{where}.sentences[{j}]')).strip()
                  for j, s in enumerate(sentences)]
      image_id = _field(entry, self.ID_KEY, where, int)
      filename = _field(entry, 'filename', where, str)
      path = self._image_path(manual, entry, where)
      if not path.is_file():
        missing.append((path, where))
      by_split[split_of[split]].append({'path': path, 'captions': [c for c in captions if c],
                                 'image_id': image_id, 'filename': filename})
    if missing:
      shown = '\n'.join(f'  {p} ({w})' for p, w in missing[:5])
      more = f'\n  ... and {len(missing) - 5} more' if len(missing) > 5 else ''
      raise ManualFileError(f'{len(missing)} image file(s) listed in {json_path} do not exist:\n'
                            f'{shown}{more}\n{self.LAYOUT}')
    return by_split

  def _split_generators(self, dl_manager):
    entries = self._read_entries(self._manual_dir(dl_manager))
    empty = [s for s, e in entries.items() if not e]
    if empty:  # TFDS cannot write an empty split, and a missing one would go unnoticed
      raise KarpathyFormatError(f'{self.name}: no images in split(s) {empty} of '
                                f'{self.JSON_NAME} (Karpathy splits {SPLITS}).')
    return {split: self._generate_examples(e) for split, e in entries.items()}

  def _generate_examples(self, entries: list[dict]) -> Iterator[tuple[int, dict]]:
    for i, e in enumerate(entries):
      yield i, {'image_bytes': e['path'].read_bytes(), 'captions': e['captions'],
                'image_id': e['image_id'], 'filename': e['filename'], 'index': i}


class Beit3CocoKarpathy(_KarpathyBuilder):
  """COCO 2014 images with their captions, in Karpathy's splits (train includes restval)."""
  name = 'beit3_coco_karpathy'
  JSON_NAME = 'dataset_coco.json'
  ID_KEY = 'cocoid'
  LAYOUT = _COCO_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = _COCO_LAYOUT

  def _image_path(self, manual, entry, where):
    folder = _field(entry, 'filepath', where, str)
    return manual / folder / _field(entry, 'filename', where, str)


class Beit3Flickr30kKarpathy(_KarpathyBuilder):
  """Flickr30k images with their captions, in Karpathy's splits."""
  name = 'beit3_flickr30k_karpathy'
  JSON_NAME = 'dataset_flickr30k.json'
  ID_KEY = 'imgid'
  LAYOUT = _FLICKR_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FLICKR_LAYOUT

  def _image_path(self, manual, entry, where):
    return manual / 'flickr30k-images' / _field(entry, 'filename', where, str)


BUILDERS: dict[str, type[_KarpathyBuilder]] = {
    'coco': Beit3CocoKarpathy, 'flickr30k': Beit3Flickr30kKarpathy}


def builder_class(name: str) -> type[_KarpathyBuilder]:
  """The builder class of 'coco' / 'flickr30k' or of its TFDS name ('beit3_coco_karpathy')."""
  for key, cls in BUILDERS.items():
    if name in (key, cls.name):
      return cls
  raise ValueError(f'Unknown Karpathy data set {name!r}; expected one of '
                   f'{[n for k, c in BUILDERS.items() for n in (k, c.name)]}.')


def prepare(name: str, manual_dir: str | os.PathLike | None = None,
            data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds one data set once, into `paths.tfds_dir(data_dir)`, and reuses it after that.

  Args:
    name: 'coco' or 'flickr30k' (or the TFDS names 'beit3_coco_karpathy',
      'beit3_flickr30k_karpathy').
    manual_dir: the folder with the official files (see the module docstring). Only needed to
      build: a prepared data set is reused without it.
    data_dir: the project data dir (None: the default, see `beit3_jax.data.paths`). The TFDS
      files go under its `tfds/`.

  Returns:
    The prepared builder, e.g. `prepare('coco', '/data/coco').as_data_source('test')`.
  """
  cls = builder_class(name)
  builder = cls(data_dir=paths.tfds_dir(data_dir), file_format='array_record')
  if builder.is_prepared():
    print(f'Reusing {builder.name} at {builder.data_dir}')
    return builder
  if manual_dir is None:
    raise ManualFileError(f'{builder.name} is not prepared under {builder.data_dir} and no '
                          f'manual_dir was given to build it from.\n{cls.LAYOUT}')
  seconds = local_files.build_from_manual_dir(builder, manual_dir)
  sizes = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  print(f'Built {builder.name} {sizes} in {seconds:.1f} s')
  return builder
