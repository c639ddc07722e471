"""Random-access sources of prepared TFDS data sets, opened by name, never downloading.

`open_source('coco_captions/2017:1.1.0', 'train', data_dir)` reads a data set that was
prepared beforehand (in array_record format, which grain reads without TensorFlow) under
`tfds_dir`. Nothing here touches the network: a data set that is not there fails at once with
a message that says how to prepare it, instead of TFDS's download attempt (which hangs on a
machine without network).

A data set under a remote data dir (gs://bucket/data/tfds) is read from a local copy: at start
`open_source` copies the files of the split it opens (and the data set's metadata files) to
`paths.remote_cache_dir()` (default ~/.cache/beit3_jax/remote_cache/gs/<bucket>/<path>), prints
their size and the seconds it took, and reuses that copy afterwards while each remote file keeps
its size and generation. ArrayRecord could read gs:// itself, but with one request per record
(random access), so a data set that does not fit on the local disk is read in place with
$BEIT3_JAX_REMOTE_DATA_CACHE=off.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import time
from typing import Sequence

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
  cache_dir = paths.remote_cache_dir() if paths.is_remote(folder) else None
  if cache_dir is not None and builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    folder = local_copy(folder, [base], cache_dir, builder=builder)
    builder = tfds.builder_from_directory(folder)
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise DatasetNotPreparedError(
        f'{folder} is not in array_record format, which random access needs. '
        + _how_to_prepare(name.split('/')[0].split(':')[0], str(folder.parent.parent))) from e


_COPY_MANIFEST = '.remote_copy.json'   # file name -> [size, generation] of each copied file


def _stamp(entry: dict) -> list:
  """[size in bytes, version] of a remote file's listing entry (GCS: its generation)."""
  version = next((entry[k] for k in ('generation', 'etag', 'mtime', 'updated', 'LastModified')
                  if entry.get(k)), '')
  return [int(entry.get('size') or 0), str(version)]


def _mib(n: int) -> str:
  return f'{n / 2**20:,.1f} MiB'


def local_copy(folder, splits: Sequence[str], cache_dir: str, *, builder=None) -> epath.Path:
  """The local copy of `splits` of a prepared data set in a remote `folder` (a TFDS version
  folder, e.g. gs://bucket/tfds/coco_captions/2017/1.1.0), made or brought up to date now.

  Copies the shards of `splits` and every file that is not a shard of a split (dataset_info.json,
  features.json, label files) to `paths.remote_cache_path(folder, cache_dir)`, skipping files
  whose remote size and generation are those of the copy already there, and prints what it
  copied (MiB, seconds) or reused.

  Args:
    folder: the remote version folder (str or epath.Path).
    splits: split names (no slices), e.g. ['train'].
    cache_dir: the local cache root (`paths.remote_cache_dir()`).
    builder: `tfds.builder_from_directory(folder)` if already opened.

  Raises:
    DatasetNotPreparedError: a shard that dataset_info.json lists is not in `folder`.
    OSError: the local disk lacks the space (the message says how to read in place instead).
  """
  import fsspec
  url = str(folder).rstrip('/')
  builder = builder or tfds.builder_from_directory(folder)
  local = paths.remote_cache_path(url, cache_dir)
  every_shard = {f for info in builder.info.splits.values() for f in info.filenames}
  wanted = {f for split in splits for f in builder.info.splits[split].filenames}
  fs, root = fsspec.core.url_to_fs(url)
  listing = {posixpath.basename(e['name'].rstrip('/')): e
             for e in fs.ls(root, detail=True, refresh=True) if e.get('type') == 'file'}
  missing = sorted(wanted - set(listing))
  if missing:
    raise DatasetNotPreparedError(
        f'{url} lacks {len(missing)} shard(s) of split(s) {list(splits)} that its '
        f'dataset_info.json lists, e.g. {missing[0]}: copy the whole prepared folder there.')
  names = sorted(n for n in listing if n not in every_shard or n in wanted)
  stamps = {n: _stamp(listing[n]) for n in names}
  manifest_file = os.path.join(local, _COPY_MANIFEST)
  manifest = _read_manifest(manifest_file)
  todo = [n for n in names if manifest.get(n) != stamps[n]
          or not _has_size(os.path.join(local, n), stamps[n][0])]
  total = sum(stamp[0] for stamp in stamps.values())
  what = f'{"/".join(splits)} of {url}'
  if not todo:
    print(f'Reusing the local copy of {what} at {local} ({_mib(total)}, up to date)', flush=True)
    return epath.Path(local)
  need = sum(stamps[n][0] for n in todo)
  os.makedirs(local, exist_ok=True)
  free = shutil.disk_usage(local).free
  if need > free:
    raise OSError(
        f'Copying {what} to {local} needs {_mib(need)}; that disk has {_mib(free)} free. Point '
        f'${paths.REMOTE_CACHE_ENV_VAR} at a local folder on a larger disk, or set it to '
        f'{paths.REMOTE_CACHE_OFF!r} to read the data set in place (one request per record).')
  start = time.perf_counter()
  parts = [os.path.join(local, f'.{n}.part-{os.getpid()}') for n in todo]
  try:
    fs.get([f'{root}/{n}' for n in todo], parts)
    for name, part in zip(todo, parts):
      if not _has_size(part, stamps[name][0]):
        raise OSError(f'Copying {url}/{name} to {local} gave {os.path.getsize(part)} bytes, '
                      f'expected {stamps[name][0]}; was it rewritten meanwhile? Run again.')
      os.replace(part, os.path.join(local, name))
  finally:
    for part in parts:
      if os.path.exists(part):
        os.remove(part)
  manifest = _read_manifest(manifest_file)   # another process may have copied other splits
  manifest.update({n: stamps[n] for n in todo})
  tmp = f'{manifest_file}.part-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, manifest_file)
  seconds = time.perf_counter() - start
  print(f'Copied {len(todo)} file(s), {_mib(need)}, of {what} to {local} in {seconds:.1f} s '
        f'({_mib(need / max(seconds, 1e-6))}/s; {len(names) - len(todo)} up to date)', flush=True)
  return epath.Path(local)


def _read_manifest(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (FileNotFoundError, ValueError):
    return {}
  return manifest if isinstance(manifest, dict) else {}


def _has_size(path: str, size: int) -> bool:
  try:
    return os.path.getsize(path) == size
  except OSError:
    return False
