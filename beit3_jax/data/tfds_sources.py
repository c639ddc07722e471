"""Random-access sources of prepared TFDS data sets, opened by name, never downloading.

`open_source('coco_captions/2017:1.1.0', 'train', data_dir)` reads a data set that was
prepared beforehand (in array_record format, which grain reads without TensorFlow) under
`tfds_dir`. Nothing here touches the network: a data set that is not there fails at once with
a message that says how to prepare it, instead of TFDS's download attempt (which hangs on a
machine without network).
"""

from __future__ import annotations

import re

import tensorflow_datasets as tfds
from etils import epath

from beit3_jax.data import paths

_NAME = re.compile(r'^(?P<name>[a-z0-9_]+)(/(?P<config>[\w.-]+))?(:(?P<version>[\d.]+))?$')


class DatasetNotPreparedError(FileNotFoundError):
  """The data set is not prepared under the data dir; the message says how to prepare it."""


class MissingSplitError(KeyError):
  """The data set has no such split; the message names the ones it has."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ''


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (f'Prepare it where its data is reachable, e.g.\n'
          f'  tfds build {name} --data_dir={data_dir} --file_format=array_record\n'
          f'(data sets with manual downloads such as imagenet2012 also need '
          f'--manual_dir=DIR), then copy the folder here or point data_dir at it. '
          f'Prepared data sets in tfrecord format convert with\n'
          f'  tfds convert_format --root_data_dir={data_dir} --out_file_format=array_record')


def dataset_dir(name: str, tfds_dir: str | None = None) -> epath.Path:
  """The prepared folder `<tfds_dir>/<name>[/<config>]/<version>` (newest version if unset).

  `tfds_dir` is a TFDS data dir (local or gs://); default `paths.tfds_dir()`.
  """
  match = _NAME.match(name)
  if not match:
    raise ValueError(f'TFDS name {name!r}: expected name[/config][:version], e.g. '
                     '"coco_captions/2017:1.1.0".')
  root = epath.Path(tfds_dir or paths.tfds_dir())
  folder = root / match['name']
  if match['config']:
    folder = folder / match['config']
  if match['version']:
    candidates = [folder / match['version']]
  else:
    candidates = sorted((p for p in folder.glob('*') if (p / 'dataset_info.json').exists()),
                        key=lambda p: tuple(int(x) for x in p.name.split('.') if x.isdigit()))
  candidates = [p for p in candidates if (p / 'dataset_info.json').exists()]
  if not candidates:
    raise DatasetNotPreparedError(
        f'TFDS data set {name!r} is not prepared under {root} (looked for '
        f'{folder}/<version>/dataset_info.json). ' + _how_to_prepare(match['name'], str(root)))
  return candidates[-1]


def open_source(name: str, split: str, tfds_dir: str | None = None):
  """A random-access source (len, [i]) of one split of a prepared data set in `tfds_dir`."""
  folder = dataset_dir(name, tfds_dir)
  builder = tfds.builder_from_directory(folder)
  base = split.split('[')[0]   # 'train[99.9%:]': a slice of the train split
  if base not in builder.info.splits:
    raise MissingSplitError(f'{name} (in {folder}) has no split {base!r}; it has '
                            f'{sorted(builder.info.splits)}.')
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise DatasetNotPreparedError(
        f'{folder} is not in array_record format, which random access needs. '
        + _how_to_prepare(name.split('/')[0].split(':')[0], str(folder.parent.parent))) from e
