"""TFDS builder of ImageNet-1k (ILSVRC2012), prepared from the official files in a manual dir.

Nothing is downloaded: the user fetches the official files (https://image-net.org/download.php,
or Kaggle's "imagenet-object-localization-challenge") and points `manual_dir` at them. Image
classification fine-tuning reads the result like TFDS's own `imagenet2012` (same features).

    builder = prepare(manual_dir='/data/imagenet', data_dir=None)   # builds once, reuses
    source = builder.as_data_source('validation')                   # len 50,000
    # or, in another process, without importing this module:
    source = tfds.data_source('beit3_imagenet2012', split='validation',
                              data_dir=paths.tfds_dir(None), download=False)
    # or beit3_jax.data.tfds_sources.open_source('beit3_imagenet2012', 'validation')

Manual dir layout. Train and validation are each found in one of two forms, the original tars
(looked for first) or already-extracted folders:

    <manual_dir>/
      ILSVRC2012_img_train.tar    a tar of 1000 per-class tars n01440764.tar, ..., each holding
                                  n01440764_10026.JPEG, ...        (138 GB, 1,281,167 images)
      ILSVRC2012_img_val.tar      ILSVRC2012_val_00000001.JPEG ... _00050000.JPEG, flat (6.3 GB)
      LOC_val_solution.csv        validation labels (Kaggle): header `ImageId,PredictionString`,
                                  rows `ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`;
                                  the first token of PredictionString is the image's wnid
      validation_labels.txt       or: one wnid a line, line i labelling the i-th validation
                                  image in sorted file-name order (the file TFDS's
                                  imagenet2012 ships)
      LOC_synset_mapping.txt      optional (Kaggle): `n01440764 tench, Tinca tinca` a line;
                                  gives the class names

    or, extracted (either at the top or under Kaggle's ILSVRC/Data/CLS-LOC/):
      train/<wnid>/<wnid>_<n>.JPEG
      val/ILSVRC2012_val_<8 digits>.JPEG   (labels from one of the two label files above)
      val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG   (or this: labels from the folders)

The label files and the synset mapping always sit at the top of `manual_dir`. A tar is read in
place, member by member (nothing is extracted to disk). Files that are not images (by file
extension, `local_files.IMAGE_EXTENSIONS`) or whose names start with '.' are skipped. The
devkit's `ILSVRC2012_validation_ground_truth.txt` (ILSVRC ids, not wnids) is not read: use one
of the two label files.

Classes: the wnids of the train set (per-class tars or folders), sorted; the class index of a
wnid is its position in that list, the order TFDS's imagenet2012 and timm use (n01440764 = 0,
..., n15075141 = 999). The wnids are also written, one a line in class order, as `wnids.txt`
into the builder's data dir (`load_wnids(builder)`).

Splits: 'train' (in class order, then sorted file names within a class) and 'validation'
(sorted file names). Record i of a split is example i (`disable_shuffling=True`): the tar and
the extracted layouts give identical data sets.

Features, as `tfds.data_source` reads them back (numpy, no TensorFlow; text comes back as bytes):

- image: uint8 (H, W, 3), decoded on access from the stored bytes, which are the original
  files' bytes, never re-encoded (unlike TFDS's imagenet2012, which re-encodes the 22 CMYK
  JPEGs and the one PNG-named-.JPEG of the train set). TFDS decodes with PIL (or OpenCV):
  grayscale JPEGs come back with their channel repeated to 3, but a CMYK JPEG comes back as
  its 4 CMYK channels under PIL (the project's input pipeline skips and counts such arrays).
  To get the encoded bytes instead, read with
  `tfds.data_source(..., decoders={'image': tfds.decode.SkipDecoding()})`; the pipeline's
  `pretraining.load_image` / `image_ops.decode_pil` turn any of them into RGB.
- label: int64 scalar, the class index in [0, num_classes). ClassLabel names: the wnids, or,
  if `LOC_synset_mapping.txt` is given, the mapped names ('tench, Tinca tinca'); a name that
  two classes share (ImageNet's two 'crane's) gets its wnid appended: 'crane (n02012849)'.
- file_name: bytes, the image's file name, e.g. b'n01440764_10026.JPEG',
  b'ILSVRC2012_val_00000001.JPEG'.

Errors, all raised before anything is written, except those inside the per-class train tars:
a missing file or folder raises FileNotFoundError naming the paths looked for and the layout;
a validation image without a label raises `AnnotationError` naming the image (and labels
without an image name the label file); an unknown wnid in a label file or the synset mapping
names file:line; an unreadable tar names the tar (and member).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import posixpath
import tarfile
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from beit3_jax.data import local_files, paths
from beit3_jax.data.local_files import IMAGE_EXTENSIONS, AnnotationError

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
VAL_SOLUTION = 'LOC_val_solution.csv'
VAL_LABELS = 'validation_labels.txt'
SYNSET_MAPPING = 'LOC_synset_mapping.txt'
KAGGLE_DIR = os.path.join('ILSVRC', 'Data', 'CLS-LOC')
WNIDS_FILE = 'wnids.txt'
NUM_CLASSES = 1000

LAYOUT = f"""Expected ImageNet-1k (ILSVRC2012) manual dir layout:
  {TRAIN_TAR}   tar of per-class tars <wnid>.tar of <wnid>_<n>.JPEG
                                (or extracted: train/<wnid>/*.JPEG)
  {VAL_TAR}     ILSVRC2012_val_<8 digits>.JPEG, flat
                                (or extracted: val/*.JPEG, or val/<wnid>/*.JPEG)
  {VAL_SOLUTION}          validation labels (Kaggle: ImageId,PredictionString)
    or {VAL_LABELS}    one wnid a line, in sorted validation file-name order
  {SYNSET_MAPPING}        optional: '<wnid> <class name>' a line
Extracted folders may also sit under {KAGGLE_DIR}/ (Kaggle's layout). Files from
https://image-net.org/download.php or Kaggle's imagenet-object-localization-challenge."""


# ------------------------------------------------------------------------------------ listing


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Where one split's images are.

  kind: 'tar' (`path` is a tar file) or 'folder' (`path` is a directory).
  items: for train, (wnid, member name of its class tar in `path` / its folder path) in class
    order; for validation, (member name in `path` / file path, file name, class index) in
    sorted file-name order.
  """
  kind: str
  path: str
  items: tuple


def _is_image(name: str) -> bool:
  base = posixpath.basename(name)
  return not base.startswith('.') and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _open_tar(path: str, fileobj=None, where: str = ''):
  try:
    return tarfile.open(path if fileobj is None else None, mode='r:', fileobj=fileobj)
  except (tarfile.TarError, OSError) as e:
    raise AnnotationError(f'{where or path}: not a readable (uncompressed) tar file ({e}); '
                          'the download may be incomplete.') from e


def _tar_images(tar: tarfile.TarFile, where: str) -> list[tarfile.TarInfo]:
  """The image members of an open tar, sorted by file name."""
  try:
    members = tar.getmembers()
  except (tarfile.TarError, OSError) as e:
    raise AnnotationError(f'{where}: cannot list the tar ({e}); the download may be '
                          'incomplete.') from e
  images = [m for m in members if m.isfile() and _is_image(m.name)]
  return sorted(images, key=lambda m: posixpath.basename(m.name))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> bytes:
  try:
    data = tar.extractfile(member).read()
  except (tarfile.TarError, OSError) as e:
    raise AnnotationError(f'{where}: cannot read member {member.name} ({e}); the tar may be '
                          'truncated.') from e
  if len(data) != member.size:
    raise AnnotationError(f'{where}: member {member.name} has {len(data)} of its '
                          f'{member.size} bytes; the tar is truncated.')
  return data


def _folder_images(folder: str) -> list[str]:
  """The image files (full paths) directly in `folder`, sorted by file name."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if _is_image(f) and os.path.isfile(os.path.join(folder, f)))


def _first_existing(candidates: Sequence[str], test) -> str | None:
  return next((c for c in candidates if test(c)), None)


def find_train(manual_dir: str) -> ImageSource:
  """The train images: `ILSVRC2012_img_train.tar`, else a `train/` folder (at the top or under
  ILSVRC/Data/CLS-LOC/). Lists the classes only (the tar's headers, not its images)."""
  tar_path = os.path.join(manual_dir, TRAIN_TAR)
  folders = [os.path.join(manual_dir, 'train'), os.path.join(manual_dir, KAGGLE_DIR, 'train')]
  if os.path.isfile(tar_path):
    with _open_tar(tar_path) as tar:
      try:
        members = tar.getmembers()
      except (tarfile.TarError, OSError) as e:
        raise AnnotationError(f'{tar_path}: cannot list the tar ({e}); the download may be '
                              'incomplete.') from e
    classes = {}
    for m in members:
      base = posixpath.basename(m.name)
      if not m.isfile() or base.startswith('.'):
        continue
      if not base.endswith('.tar'):
        raise AnnotationError(f'{tar_path}: member {m.name} is not a per-class tar '
                              '(<wnid>.tar); is this the train tar?')
      classes[base[:-len('.tar')]] = m.name
    if not classes:
      raise AnnotationError(f'{tar_path}: no per-class tars (<wnid>.tar) in it.\n{LAYOUT}')
    return ImageSource('tar', tar_path, tuple((w, classes[w]) for w in sorted(classes)))
  folder = _first_existing(folders, os.path.isdir)
  if folder is None:
    raise FileNotFoundError(f'No ImageNet train images: neither {tar_path} nor a folder '
                            f'{" or ".join(folders)} exists.\n{LAYOUT}')
  wnids = sorted(d for d in os.listdir(folder)
                 if not d.startswith('.') and os.path.isdir(os.path.join(folder, d)))
  if not wnids:
    raise AnnotationError(f'{folder}: no class folders (train/<wnid>/*.JPEG).\n{LAYOUT}')
  return ImageSource('folder', folder, tuple((w, os.path.join(folder, w)) for w in wnids))


def _stem(file_name: str) -> str:
  return os.path.splitext(posixpath.basename(file_name))[0]


def read_val_solution(path: str, class_index: dict[str, int]) -> dict[str, int]:
  """{image id ('ILSVRC2012_val_00008726'): class index} of a Kaggle `LOC_val_solution.csv`
  (label = the first token, the wnid, of PredictionString)."""
  labels: dict[str, int] = {}
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.DictReader(f)
    missing = {'ImageId', 'PredictionString'} - set(reader.fieldnames or ())
    if missing:
      raise AnnotationError(f'{path}:1: expected the header ImageId,PredictionString; got '
                            f'{reader.fieldnames} (no {sorted(missing)}).')
    for n, row in enumerate(reader, start=2):  # line 1 is the header
      where = f'{path}:{n}'
      image_id = (row['ImageId'] or '').strip()
      tokens = (row['PredictionString'] or '').split()
      if not image_id or not tokens:
        raise AnnotationError(f'{where}: expected "ImageId,<wnid> <box> ..."; got {row}.')
      if tokens[0] not in class_index:
        raise AnnotationError(f'{where}: unknown wnid {tokens[0]!r} for {image_id} (not one of '
                              f'the {len(class_index)} train classes).')
      if labels.setdefault(image_id, class_index[tokens[0]]) != class_index[tokens[0]]:
        raise AnnotationError(f'{where}: {image_id} is labelled twice, differently.')
  return labels


def read_validation_labels(path: str, file_names: Sequence[str],
                           class_index: dict[str, int]) -> dict[str, int]:
  """{image id: class index} of a `validation_labels.txt` (one wnid a line; line i labels
  `sorted(file_names)[i - 1]`)."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  names = sorted(file_names, key=posixpath.basename)
  if len(lines) != len(names):
    raise AnnotationError(f'{path}: {len(lines)} labels for {len(names)} validation images; '
                          'line i labels the i-th image in sorted file-name order.')
  labels = {}
  for n, (line, name) in enumerate(zip(lines, names), start=1):
    wnid = line.strip()
    if wnid not in class_index:
      raise AnnotationError(f'{path}:{n}: unknown wnid {wnid!r} for {posixpath.basename(name)} '
                            f'(not one of the {len(class_index)} train classes).')
    labels[_stem(name)] = class_index[wnid]
  return labels


def _val_labels(manual_dir: str, file_names: Sequence[str], source: str,
                class_index: dict[str, int]) -> tuple[dict[str, int], str]:
  """({image id: class index}, label file) from the first label file in the manual dir."""
  solution = os.path.join(manual_dir, VAL_SOLUTION)
  plain = os.path.join(manual_dir, VAL_LABELS)
  if os.path.isfile(solution):
    labels = read_val_solution(solution, class_index)
    extra = sorted(set(labels) - {_stem(n) for n in file_names})
    if extra:
      raise AnnotationError(f'{solution}: {len(extra)} labelled image(s) are not in {source}, '
                            f'e.g. {extra[:5]}; the validation images may be incomplete.')
    return labels, solution
  if os.path.isfile(plain):
    return read_validation_labels(plain, file_names, class_index), plain
  raise FileNotFoundError(f'No validation labels for {source}: neither {solution} nor {plain} '
                          f'exists.\n{LAYOUT}')


def find_validation(manual_dir: str, wnids: Sequence[str]) -> ImageSource:
  """The validation images with their class indices (`wnids`: the classes, in class order)."""
  class_index = {w: i for i, w in enumerate(wnids)}
  tar_path = os.path.join(manual_dir, VAL_TAR)
  folders = [os.path.join(manual_dir, 'val'), os.path.join(manual_dir, KAGGLE_DIR, 'val')]
  if os.path.isfile(tar_path):
    with _open_tar(tar_path) as tar:
      members = [m.name for m in _tar_images(tar, tar_path)]
    kind, path, source = 'tar', tar_path, tar_path
  else:
    path = _first_existing(folders, os.path.isdir)
    if path is None:
      raise FileNotFoundError(f'No ImageNet validation images: neither {tar_path} nor a folder '
                              f'{" or ".join(folders)} exists.\n{LAYOUT}')
    kind, source = 'folder', path
    subdirs = sorted(d for d in os.listdir(path)
                     if not d.startswith('.') and os.path.isdir(os.path.join(path, d)))
    members = _folder_images(path)
    if subdirs and members:
      raise AnnotationError(f'{path}: holds both images and class folders {subdirs[:3]}; '
                            'expected one of val/*.JPEG or val/<wnid>/*.JPEG.')
    if subdirs:  # val/<wnid>/*.JPEG: the folders are the labels
      items = []
      for d in subdirs:
        if d not in class_index:
          raise AnnotationError(f'{os.path.join(path, d)}: unknown wnid {d!r} (not one of the '
                                f'{len(class_index)} train classes).')
        items += [(p, os.path.basename(p), class_index[d])
                  for p in _folder_images(os.path.join(path, d))]
      items.sort(key=lambda item: item[1])
      if not items:
        raise AnnotationError(f'{path}: no validation images in its class folders.')
      return ImageSource(kind, path, tuple(items))
  if not members:
    raise AnnotationError(f'{source}: no validation images (ILSVRC2012_val_*.JPEG).\n{LAYOUT}')
  labels, label_file = _val_labels(manual_dir, members, source, class_index)
  unlabelled = [posixpath.basename(m) for m in members if _stem(m) not in labels]
  if unlabelled:
    shown = '\n'.join(f'  {n}' for n in unlabelled[:5])
    more = f'\n  ... and {len(unlabelled) - 5} more' if len(unlabelled) > 5 else ''
    raise AnnotationError(f'{len(unlabelled)} validation image(s) in {source} have no label in '
                          f'{label_file}:\n{shown}{more}')
  return ImageSource(kind, path, tuple((m, posixpath.basename(m), labels[_stem(m)])
                                       for m in members))


def read_synset_mapping(path: str, wnids: Sequence[str]) -> list[str]:
  """The class names of `wnids` from a `LOC_synset_mapping.txt` ('<wnid> <name>' a line); a
  name shared by several classes gets ' (<wnid>)' appended, as ClassLabel names are unique."""
  mapping = {}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      parts = line.strip().split(None, 1)
      if len(parts) != 2:
        raise AnnotationError(f'{path}:{n}: expected "<wnid> <class name>", got {line.strip()!r}.')
      mapping[parts[0]] = parts[1].strip()
  unnamed = [w for w in wnids if w not in mapping]
  if unnamed:
    raise AnnotationError(f'{path}: no name for {len(unnamed)} train class(es), e.g. '
                          f'{unnamed[:5]}.')
  names = [mapping[w] for w in wnids]
  counts = {n: names.count(n) for n in set(names)}
  return [f'{n} ({w})' if counts[n] > 1 else n for n, w in zip(names, wnids)]


def wnids_path(builder_or_dir) -> str:
  """Where the wnids (one a line, class order) of a prepared builder (or its data dir) lie."""
  data_dir = getattr(builder_or_dir, 'data_dir', builder_or_dir)
  return os.path.join(os.fspath(data_dir), WNIDS_FILE)


def load_wnids(builder_or_dir) -> list[str]:
  """The wnids of a prepared builder in class order (class i = wnids[i]), given the builder or
  its data dir (`<tfds dir>/beit3_imagenet2012/1.0.0`)."""
  path = wnids_path(builder_or_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No wnids file at {path}; prepare beit3_imagenet2012 first.')
  with open(path, encoding='utf-8') as f:
    return f.read().split()


# ------------------------------------------------------------------------------------ builder


class Beit3Imagenet2012(tfds.core.GeneratorBasedBuilder):
  """ImageNet-1k (ILSVRC2012) train and validation from the official files (see module doc)."""
  name = 'beit3_imagenet2012'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

  def __init__(self, *, manual_dir: str | os.PathLike | None = None, **kwargs):
    self._manual = None if manual_dir is None else os.fspath(manual_dir)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            # Names are set from the manual dir when building, read back from the files after.
            'label': tfds.features.ClassLabel(),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org/',
        disable_shuffling=True)

  def _manual_root(self, dl_manager) -> str:
    if self._manual is None:
      try:
        self._manual = os.fspath(dl_manager.manual_dir)
      except AssertionError as e:  # not given, missing or empty
        raise FileNotFoundError(
            f'{self.name} needs its files in a manual dir ({e}). Pass it with '
            'download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR)) '
            f'or imagenet.prepare(manual_dir=DIR).\n{LAYOUT}') from e
    if not os.path.isdir(self._manual):
      raise FileNotFoundError(f'Manual dir {self._manual} does not exist.\n{LAYOUT}')
    return self._manual

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    train = find_train(root)
    wnids = [w for w, _ in train.items]
    validation = find_validation(root, wnids)  # checks every label before writing
    mapping = os.path.join(root, SYNSET_MAPPING)
    names = read_synset_mapping(mapping, wnids) if os.path.isfile(mapping) else wnids
    self.info.features['label'].names = names
    os.makedirs(self.data_dir, exist_ok=True)  # the temporary dir, renamed when done
    with open(wnids_path(self), 'w', encoding='utf-8') as f:
      f.write(''.join(f'{w}\n' for w in wnids))
    return {'train': self._generate_examples(train, 'train'),
            'validation': self._generate_examples(validation, 'validation')}

  def _generate_examples(self, source: ImageSource, split: str) -> Iterator[tuple[str, dict]]:
    """(file name, {'image': encoded bytes, 'label': class index, 'file_name'}) in order."""
    if split == 'train':
      return self._generate_train(source)
    return self._generate_validation(source)

  def _generate_train(self, source: ImageSource) -> Iterator[tuple[str, dict]]:
    if source.kind == 'folder':
      for label, (wnid, folder) in enumerate(source.items):
        files = _folder_images(folder)
        if not files:
          raise AnnotationError(f'{folder}: no images of class {wnid}.')
        for path in files:
          with open(path, 'rb') as f:
            data = f.read()
          yield os.path.basename(path), {'image': data, 'label': label,
                                         'file_name': os.path.basename(path)}
      return
    with _open_tar(source.path) as outer:
      members = {m.name: m for m in outer.getmembers()}
      for label, (wnid, name) in enumerate(source.items):
        where = f'{source.path}: member {name}'
        with _open_tar(source.path, outer.extractfile(members[name]), where) as inner:
          images = _tar_images(inner, where)
          if not images:
            raise AnnotationError(f'{where}: no images of class {wnid}.')
          for m in images:
            file_name = posixpath.basename(m.name)
            yield file_name, {'image': _read_member(inner, m, where), 'label': label,
                              'file_name': file_name}

  def _generate_validation(self, source: ImageSource) -> Iterator[tuple[str, dict]]:
    if source.kind == 'folder':
      for path, file_name, label in source.items:
        with open(path, 'rb') as f:
          yield file_name, {'image': f.read(), 'label': label, 'file_name': file_name}
      return
    with _open_tar(source.path) as tar:
      members = {m.name: m for m in tar.getmembers()}
      for name, file_name, label in source.items:
        yield file_name, {'image': _read_member(tar, members[name], source.path),
                          'label': label, 'file_name': file_name}


def prepare(manual_dir: str | os.PathLike | None = None,
            data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds ImageNet-1k once, into `paths.tfds_dir(data_dir)`, and reuses it after that.

  Args:
    manual_dir: the folder with the official files (layout in the module docstring). Only
      needed to build: a prepared data set is reused without it.
    data_dir: the project data dir (None: the default of `beit3_jax.data.paths`). The TFDS
      files go under its `tfds/`.

  Returns:
    The prepared builder: `.as_data_source('train' | 'validation')`, `.data_dir`,
    `.info.features['label'].names`; `load_wnids(builder)`.
  """
  builder = Beit3Imagenet2012(manual_dir=manual_dir, data_dir=paths.tfds_dir(data_dir),
                              file_format='array_record')
  if builder.is_prepared():
    print(f'Reusing {builder.name} at {builder.data_dir}')
    return builder
  if manual_dir is None:
    raise FileNotFoundError(f'{builder.name} is not prepared under {builder.data_dir} and no '
                            f'manual_dir was given to build it from.\n{LAYOUT}')
  seconds = local_files.build_from_manual_dir(builder, manual_dir)
  sizes = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  classes = builder.info.features['label'].num_classes
  note = '' if classes == NUM_CLASSES else f' (ImageNet-1k has {NUM_CLASSES})'
  print(f'Built {builder.name} {sizes}, {classes} classes{note}, in '
        f'{seconds:.1f} s')
  return builder
