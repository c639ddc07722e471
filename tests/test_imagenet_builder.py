"""ImageNet-1k builder (beit3_jax.data.builders.imagenet) over tiny official-format files."""

import io
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import paths, tfds_sources
from beit3_jax.data.builders import imagenet

WNIDS = ['n01440764', 'n02012849', 'n03126707']  # sorted: class i = WNIDS[i]
NAMES = {'n01440764': 'tench, Tinca tinca', 'n02012849': 'crane', 'n03126707': 'crane'}
TRAIN = [(w, f'{w}_{n}.JPEG') for w in WNIDS for n in (10026, 9)]  # 2 images a class
# Validation images 1..4 in file order with their wnids (listed in the CSV out of order).
VAL = [(f'ILSVRC2012_val_{i:08d}.JPEG', w)
       for i, w in enumerate(['n03126707', 'n01440764', 'n03126707', 'n02012849'], start=1)]


def colour(file_name):
  """A distinct solid RGB colour per image."""
  h = sum(ord(c) * (i + 1) for i, c in enumerate(file_name))
  return (h % 200 + 20, (h // 7) % 200 + 20, (h // 49) % 200 + 20)


def jpeg(file_name):
  buf = io.BytesIO()
  Image.new('RGB', (10, 6), colour(file_name)).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_tars(root, labels='csv'):
  """The original tars, the Kaggle val solution (or TFDS's plain labels) and synset mapping."""
  os.makedirs(root, exist_ok=True)
  with tarfile.open(root / imagenet.TRAIN_TAR, 'w') as outer:
    for w in reversed(WNIDS):  # member order must not matter
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as inner:
        for wnid, name in TRAIN:
          if wnid == w:
            add(inner, name, jpeg(name))
      add(outer, f'{w}.tar', buf.getvalue())
  with tarfile.open(root / imagenet.VAL_TAR, 'w') as tar:
    for name, _ in reversed(VAL):
      add(tar, name, jpeg(name))
  if labels == 'csv':
    rows = [f'{name[:-5]},{w} 10 20 30 40 {w} 1 2 3 4' for name, w in VAL]
    (root / imagenet.VAL_SOLUTION).write_text(
        'ImageId,PredictionString\n' + '\n'.join([rows[2], rows[0], rows[3], rows[1]]) + '\n')
  else:
    (root / imagenet.VAL_LABELS).write_text(''.join(f'{w}\n' for _, w in VAL))
  (root / imagenet.SYNSET_MAPPING).write_text(
      'n00000001 unused class\n' + ''.join(f'{w} {NAMES[w]}\n' for w in WNIDS))
  return root


def write_folders(root, val_class_folders=False):
  """Extracted folders train/<wnid>/, val/ (flat, with validation_labels.txt) or val/<wnid>/."""
  for wnid, name in TRAIN:
    os.makedirs(root / 'train' / wnid, exist_ok=True)
    (root / 'train' / wnid / name).write_bytes(jpeg(name))
  for name, w in VAL:
    folder = root / 'val' / w if val_class_folders else root / 'val'
    os.makedirs(folder, exist_ok=True)
    (folder / name).write_bytes(jpeg(name))
  if not val_class_folders:
    (root / imagenet.VAL_LABELS).write_text(''.join(f'{w}\n' for _, w in VAL))
  (root / 'train' / '.DS_Store').write_text('not a class')
  return root


def read(split, data_dir, **kwargs):
  source = tfds.data_source('beit3_imagenet2012', split=split, data_dir=paths.tfds_dir(data_dir),
                            download=False, **kwargs)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  base = tmp_path_factory.mktemp('imagenet')
  manual = write_tars(base / 'manual')
  data_dir = str(base / 'data')
  return imagenet.prepare(manual, data_dir), data_dir


def test_tars_labels_counts_pixels_and_names(built):
  builder, data_dir = built
  train, val = read('train', data_dir), read('validation', data_dir)
  assert [(WNIDS[int(e['label'])], e['file_name'].decode()) for e in train] == [
      (w, n) for w, n in sorted(TRAIN, key=lambda t: (WNIDS.index(t[0]), t[1]))]
  assert [(e['file_name'].decode(), WNIDS[int(e['label'])]) for e in val] == VAL
  for e in train + val:
    image = e['image']
    assert image.dtype == np.uint8 and image.shape == (6, 10, 3)
    np.testing.assert_allclose(image[3, 5], colour(e['file_name'].decode()), atol=4)
  raw = read('validation', data_dir, decoders={'image': tfds.decode.SkipDecoding()})
  assert [e['image'] for e in raw] == [jpeg(n) for n, _ in VAL]  # stored as-is
  names = tfds.builder('beit3_imagenet2012', data_dir=paths.tfds_dir(data_dir)).info.features[
      'label'].names
  assert names == ['tench, Tinca tinca', 'crane (n02012849)', 'crane (n03126707)']
  assert imagenet.load_wnids(builder) == WNIDS
  assert {s: int(i.num_examples) for s, i in builder.info.splits.items()} == {
      'train': 6, 'validation': 4}


def test_open_source_and_reuse(built, capsys):
  builder, data_dir = built
  src = tfds_sources.open_source('beit3_imagenet2012', 'validation', paths.tfds_dir(data_dir))
  assert len(src) == 4 and int(src[3]['label']) == 1
  again = imagenet.prepare(None, data_dir)
  assert 'Reusing beit3_imagenet2012' in capsys.readouterr().out
  assert again.data_dir == builder.data_dir


def test_extracted_folders_give_the_same_data(built, tmp_path):
  _, tar_dir = built
  manual = write_folders(tmp_path / 'manual')
  builder = imagenet.prepare(manual, str(tmp_path / 'data'))
  assert builder.info.features['label'].names == WNIDS  # no synset mapping: the wnids
  for split in ('train', 'validation'):
    ours = read(split, str(tmp_path / 'data'), decoders={'image': tfds.decode.SkipDecoding()})
    ref = read(split, tar_dir, decoders={'image': tfds.decode.SkipDecoding()})
    assert [(e['file_name'], int(e['label']), e['image']) for e in ours] == [
        (e['file_name'], int(e['label']), e['image']) for e in ref]
  # val/<wnid>/ folders (no label file needed) and TFDS's plain labels file with the tars.
  folders = write_folders(tmp_path / 'by_class', val_class_folders=True)
  source = imagenet.find_validation(str(folders), WNIDS)
  assert [(f, WNIDS[label]) for _, f, label in source.items] == VAL
  plain = write_tars(tmp_path / 'plain', labels='txt')
  source = imagenet.find_validation(str(plain), WNIDS)
  assert source.kind == 'tar' and [(f, WNIDS[label]) for _, f, label in source.items] == VAL


def test_errors_name_the_file(tmp_path):
  manual = write_tars(tmp_path / 'manual')
  solution = manual / imagenet.VAL_SOLUTION
  lines = solution.read_text().splitlines()
  solution.write_text('\n'.join(line for line in lines
                                if not line.startswith('ILSVRC2012_val_00000004')) + '\n')
  with pytest.raises(imagenet.AnnotationError,
                     match=r'1 validation image\(s\) in .*ILSVRC2012_img_val\.tar have no label') \
      as e:
    imagenet.prepare(manual, str(tmp_path / 'data'))
  assert 'ILSVRC2012_val_00000004.JPEG' in str(e.value)
  solution.write_text('\n'.join(lines[:2] + ['ILSVRC2012_val_00000004,n09999999 1 2 3 4']) + '\n')
  with pytest.raises(imagenet.AnnotationError,
                     match=r"LOC_val_solution\.csv:3: unknown wnid 'n09999999'"):
    imagenet.prepare(manual, str(tmp_path / 'data'))
  os.remove(manual / imagenet.VAL_SOLUTION)
  with pytest.raises(FileNotFoundError, match='LOC_val_solution.csv') as e:
    imagenet.prepare(manual, str(tmp_path / 'data'))
  assert str(manual / imagenet.VAL_LABELS) in str(e.value)
  os.remove(manual / imagenet.TRAIN_TAR)
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar') as e:
    imagenet.prepare(manual, str(tmp_path / 'data'))
  assert str(manual / 'train') in str(e.value) and 'Expected ImageNet-1k' in str(e.value)
  assert not os.path.exists(tmp_path / 'data' / 'tfds' / 'beit3_imagenet2012' / '1.0.0'
                            / 'dataset_info.json')
