"""TFDS data sets built from the user's own files: image-text pairs, class folders, text.

    build_image_text('my_pairs', {'train': 'train.jsonl', 'validation': 'val.csv'})
    build_image_folders('my_images', {'train': 'photos/train', 'validation': 'photos/val'})
    build_text('my_text', {'train': ['a.txt', 'b.txt']})

Each writes an array_record TFDS data set `<name>/1.0.0` under `paths.tfds_dir(data_dir)`
(read it back with `tfds.data_source(name, data_dir=..., split=...)`, no TensorFlow needed) and
returns a `BuildReport`. Annotation formats of image-text pairs, chosen by file extension:

- `.jsonl`: one JSON object a line with `image` (or `image_path`, `file_name`) and `caption`
  (or `text`);
- `.csv`: a header row naming an `image` (or `image_path`, `file_name`) and a `caption` (or
  `text`) column;
- `.json`: COCO captions (`images` with `id` and `file_name`, `annotations` with `image_id` and
  `caption`).

Image paths are relative to `image_root` (default: the annotation file's folder). Images are
stored as their original encoded bytes (`image_bytes`) and decoded by the input pipeline, which
skips and counts corrupt ones. A missing annotation file is an error. A malformed line (not
JSON, a field or column missing, an image file that does not exist) is an error at build time
naming the file and line, or, with `on_bad_line='skip'`, skipped and counted in the report
(`skipped['malformed annotation']`, the first locations in `bad_lines`); an empty caption is
skipped and counted in the report.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
import types
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from beit3_jax.data import paths
from beit3_jax.data import text as text_lib

_IMAGE_KEYS = ('image', 'image_path', 'file_name')
_CAPTION_KEYS = ('caption', 'text')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


class AnnotationError(ValueError):
  """A malformed annotation: the message names the file and line."""


@dataclasses.dataclass
class BuildReport:
  """What a build wrote: examples per split, skipped items by reason, and where."""
  name: str
  data_dir: str
  examples: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  class_names: list[str] | None = None
  bad_lines: list[str] = dataclasses.field(default_factory=list)   # the first 20 skipped

  def skip(self, reason: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1

  def skip_line(self, error: 'AnnotationError'):
    """Counts a malformed annotation skipped with on_bad_line='skip'."""
    self.skip('malformed annotation')
    if len(self.bad_lines) < 20:
      self.bad_lines.append(str(error))


ON_BAD_LINE = ('stop', 'skip')


# ----------------------------------------------------------------------------- readers


def _pick(record: Mapping, keys: Sequence[str], where: str, what: str):
  for k in keys:
    if k in record:
      return record[k]
  raise AnnotationError(f'{where}: no {what} field (expected one of {list(keys)}); '
                        f'got {sorted(record)}.')


def _resolve_image(path: str, root: str, where: str) -> str:
  full = path if os.path.isabs(path) else os.path.join(root, path)
  if not os.path.isfile(full):
    raise AnnotationError(f'{where}: image file {full} does not exist.')
  return full


def read_json_lines(path: str, report: BuildReport | None = None):
  """Yields ('file:line', record) for each non-blank line of a JSON-lines file; a line that is
  not a JSON object raises AnnotationError naming file:line (or, given a `report`, is counted
  there with `skip_line` and left out)."""
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      where = f'{path}:{n}'
      if not line.strip():
        continue
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise AnnotationError(f'{where}: not valid JSON ({e.msg}).') from e
        if not isinstance(record, dict):
          raise AnnotationError(f'{where}: expected a JSON object, got '
                                f'{type(record).__name__}.')
      except AnnotationError as e:
        if report is None:
          raise
        report.skip_line(e)
        continue
      yield where, record


def read_image_text(annotation_file: str, image_root: str | None = None,
                    report: BuildReport | None = None,
                    on_bad_line: str = 'stop') -> list[tuple[str, str]]:
  """(image path, caption) pairs of a .jsonl, .csv or COCO .json annotation file.

  on_bad_line: 'stop' (a malformed line raises AnnotationError naming file:line) or 'skip'
  (it is counted in `report`, which is then required, and left out).
  """
  if on_bad_line not in ON_BAD_LINE:
    raise ValueError(f'on_bad_line={on_bad_line!r}; expected one of {ON_BAD_LINE}.')
  if on_bad_line == 'skip' and report is None:
    raise ValueError("on_bad_line='skip' needs a report to count the skipped lines in.")
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f'No annotation file at {annotation_file}.')
  lenient = report if on_bad_line == 'skip' else None

  def kept(make):
    """make() or, for a malformed record in 'skip' mode, None (counted)."""
    try:
      return make()
    except AnnotationError as e:
      if lenient is None:
        raise
      lenient.skip_line(e)
      return None

  root = image_root or os.path.dirname(os.path.abspath(annotation_file))
  ext = os.path.splitext(annotation_file)[1].lower()
  raw: list[tuple[str, str, str]] = []  # (where, image path, caption)
  if ext == '.jsonl':
    for where, record in read_json_lines(annotation_file, lenient):
      raw.append(kept(lambda: (where, _pick(record, _IMAGE_KEYS, where, 'image'),
                               _pick(record, _CAPTION_KEYS, where, 'caption'))))
  elif ext == '.csv':
    with open(annotation_file, encoding='utf-8', newline='') as f:
      reader = csv.DictReader(f)
      for n, record in enumerate(reader, start=2):  # line 1 is the header
        where = f'{annotation_file}:{n}'

        def csv_row():
          if None in record or None in record.values():
            raise AnnotationError(f'{where}: expected {len(reader.fieldnames)} columns '
                                  f'{reader.fieldnames}.')
          return (where, _pick(record, _IMAGE_KEYS, where, 'image'),
                  _pick(record, _CAPTION_KEYS, where, 'caption'))
        raw.append(kept(csv_row))
  elif ext == '.json':
    with open(annotation_file, encoding='utf-8') as f:
      try:
        coco = json.load(f)
      except json.JSONDecodeError as e:
        raise AnnotationError(f'{annotation_file}:{e.lineno}: not valid JSON ({e.msg}).') from e
    if not isinstance(coco, dict) or 'images' not in coco or 'annotations' not in coco:
      raise AnnotationError(f'{annotation_file}: expected COCO captions JSON with "images" and '
                            '"annotations".')
    files = {}
    for i, image in enumerate(coco['images']):
      where = f'{annotation_file}: images[{i}]'
      files[_pick(image, ('id',), where, 'id')] = _pick(image, ('file_name',), where, 'file_name')
    for i, ann in enumerate(coco['annotations']):
      where = f'{annotation_file}: annotations[{i}]'

      def annotation():
        image_id = _pick(ann, ('image_id',), where, 'image_id')
        if image_id not in files:
          raise AnnotationError(f'{where}: image_id {image_id} is not in "images".')
        return where, files[image_id], _pick(ann, ('caption',), where, 'caption')
      raw.append(kept(annotation))
  else:
    raise AnnotationError(f'{annotation_file}: unknown annotation format {ext!r}; expected '
                          '.jsonl, .csv or COCO .json.')
  pairs = []
  for where, image, caption in filter(None, raw):
    if not isinstance(caption, str) or not caption.strip():
      if report is not None:
        report.skip('empty caption')
      continue
    path = kept(lambda: _resolve_image(str(image), root, where))
    if path is not None:
      pairs.append((path, caption.strip()))
  return pairs


def read_image_folders(root: str) -> tuple[list[tuple[str, int]], list[str]]:
  """(image path, label) of a class-per-folder tree (classes = sorted sub-folder names)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'No image folder at {root}.')
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise AnnotationError(f'{root}: no class sub-folders.')
  items = []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    for dirpath, _, files in sorted(os.walk(folder)):
      for file in sorted(files):
        if file.lower().endswith(IMAGE_EXTENSIONS):
          items.append((os.path.join(dirpath, file), label))
  return items, classes


def read_text_files(files: Sequence[str], report: BuildReport | None = None) -> Iterator[str]:
  """Non-empty lines (stripped) of plain UTF-8 text files; empty lines are counted."""
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'No text file at {path}.')
  on_empty = None if report is None else (lambda: report.skip('empty line'))
  yield from text_lib.read_sentences(files, on_empty)


# ----------------------------------------------------------------------------- builders


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over examples given in memory; one subclass per data set name."""
  VERSION = tfds.core.Version('1.0.0')
  FEATURES: Mapping = {}

  def __init__(self, split_examples: Mapping[str, Iterable[dict]] | None = None, **kwargs):
    self._split_examples = split_examples or {}
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(dict(self.FEATURES)), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(examples)
            for split, examples in self._split_examples.items()}

  def _generate_examples(self, examples):
    for i, example in enumerate(examples):
      yield i, example


_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


class _ImageTextBuilder(_LocalBuilder, skip_registration=True):
  FEATURES = {'image_bytes': _BYTES, 'image_path': tfds.features.Text(),
              'caption': tfds.features.Text()}


class _ImageFolderBuilder(_LocalBuilder, skip_registration=True):
  FEATURES = {'image_bytes': _BYTES, 'image_path': tfds.features.Text(),
              'label': tfds.features.Scalar(np.int64)}


class _TextBuilder(_LocalBuilder, skip_registration=True):
  FEATURES = {'text': tfds.features.Text()}


def _builder(base, name: str, split_examples, data_dir: str | None):
  cls = types.new_class(name, (base,), {'skip_registration': True},
                        lambda ns: ns.update({'name': name, '__module__': __name__}))
  return cls(split_examples=split_examples, data_dir=paths.tfds_dir(data_dir),
             file_format='array_record')


def _prepare(builder, report: BuildReport, overwrite: bool) -> BuildReport:
  if builder.is_prepared() and not overwrite:
    raise FileExistsError(f'{builder.data_dir} exists; pass overwrite=True to rebuild it.')
  if builder.is_prepared():
    import shutil
    shutil.rmtree(builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  report.data_dir = builder.data_dir
  report.examples = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  with open(os.path.join(builder.data_dir, 'build_report.json'), 'w') as f:
    json.dump(dataclasses.asdict(report), f, indent=2)
  return report


def _check_name(name: str):
  if not name.isidentifier() or name.lower() != name:
    raise ValueError(f'Data set name {name!r} must be a lower-case Python identifier '
                     '(e.g. my_pairs).')


def _read_bytes(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def build_image_text(name: str, splits: Mapping[str, str], *, image_root: str | None = None,
                     data_dir: str | None = None, overwrite: bool = False,
                     on_bad_line: str = 'stop') -> BuildReport:
  """Builds image-text pairs from one annotation file per split (see the module docstring;
  on_bad_line: 'stop' or 'skip' a malformed annotation line)."""
  _check_name(name)
  report = BuildReport(name, paths.tfds_dir(data_dir))
  split_pairs = {split: read_image_text(f, image_root, report, on_bad_line)
                 for split, f in splits.items()}
  examples = {split: ({'image_bytes': _read_bytes(p), 'image_path': p, 'caption': c}
                      for p, c in pairs) for split, pairs in split_pairs.items()}
  return _prepare(_builder(_ImageTextBuilder, name, examples, data_dir), report, overwrite)


def build_image_folders(name: str, splits: Mapping[str, str], *, data_dir: str | None = None,
                        overwrite: bool = False) -> BuildReport:
  """Builds labelled images from one class-per-folder tree per split (same classes in each)."""
  _check_name(name)
  report = BuildReport(name, paths.tfds_dir(data_dir))
  split_items = {}
  for split, root in splits.items():
    items, classes = read_image_folders(root)
    if report.class_names is None:
      report.class_names = classes
    elif classes != report.class_names:
      raise AnnotationError(f'{root}: classes {classes} differ from the first split\'s '
                            f'{report.class_names}.')
    split_items[split] = items
  examples = {split: ({'image_bytes': _read_bytes(p), 'image_path': p, 'label': label}
                      for p, label in items) for split, items in split_items.items()}
  return _prepare(_builder(_ImageFolderBuilder, name, examples, data_dir), report, overwrite)


def build_text(name: str, splits: Mapping[str, Sequence[str]], *, data_dir: str | None = None,
               overwrite: bool = False) -> BuildReport:
  """Builds a text corpus from plain text files (one sentence or passage a line) per split."""
  _check_name(name)
  report = BuildReport(name, paths.tfds_dir(data_dir))
  for files in splits.values():  # fail before writing anything
    for path in files:
      if not os.path.isfile(path):
        raise FileNotFoundError(f'No text file at {path}.')
  examples = {split: ({'text': t} for t in read_text_files(files, report))
              for split, files in splits.items()}
  return _prepare(_builder(_TextBuilder, name, examples, data_dir), report, overwrite)


def build_from_manual_dir(builder, manual_dir, what: str | None = None) -> float:
  """Prepares a TFDS `builder` (array_record) from the files in `manual_dir`, printing what it
  builds and where; returns the seconds it took. Never downloads anything."""
  import tensorflow_datasets as tfds
  what = what or builder.name
  print(f'Building {what} from {manual_dir} into {builder.data_dir} ...', flush=True)
  started = time.perf_counter()
  tfds.disable_progress_bar()
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return time.perf_counter() - started
