"""COCO / Flickr30k Karpathy-split builders, built from tiny official-format files in tmp_path."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import tfds_sources
from beit3_jax.data.builders import karpathy_captions as kc

# (split, folder) of the tiny COCO: 2 train + 1 restval -> train 3, val 1, test 2.
COCO = [('train', 'train2014'), ('restval', 'val2014'), ('val', 'val2014'),
        ('train', 'train2014'), ('test', 'val2014'), ('test', 'val2014')]
FLICKR = ['train', 'train', 'val', 'test']


def write_jpeg(path, width, height, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path, format='JPEG')


def image_size(i):
  return 8 + 2 * i, 6 + i  # (width, height), distinct per image


def make_coco(root):
  images = []
  for i, (split, folder) in enumerate(COCO):
    filename = f'COCO_{folder}_{1000 + i:012d}.jpg'
    write_jpeg(str(root / folder / filename), *image_size(i), 30 * i)
    images.append({'filepath': folder, 'filename': filename, 'imgid': i, 'split': split,
                   'cocoid': 1000 + i, 'sentid': [], 'sentences': [
                       {'raw': f' coco image {i} caption {j}. ', 'tokens': ['coco'],
                        'imgid': i, 'sentid': 10 * i + j} for j in range(5 + (i == 1))]})
  (root / 'dataset_coco.json').write_text(json.dumps({'images': images, 'dataset': 'coco'}))
  return root


def make_flickr(root):
  images = []
  for i, split in enumerate(FLICKR):
    filename = f'{500 + i}.jpg'
    write_jpeg(str(root / 'flickr30k-images' / filename), *image_size(i), 50 * i)
    images.append({'filename': filename, 'imgid': i, 'split': split, 'sentences': [
        {'raw': f'flickr {i} says {j}', 'tokens': []} for j in range(5)]})
  (root / 'dataset_flickr30k.json').write_text(json.dumps({'images': images}))
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Both data sets, built once with `prepare` into one project data dir."""
  base = tmp_path_factory.mktemp('karpathy')
  data_dir = str(base / 'data')
  coco = kc.prepare('coco', make_coco(base / 'coco'), data_dir)
  flickr = kc.prepare('beit3_flickr30k_karpathy', make_flickr(base / 'flickr'), data_dir)
  return {'data_dir': data_dir, 'tfds_dir': os.path.join(data_dir, 'tfds'), 'coco': coco,
          'flickr': flickr, 'base': base}


def rows(source):
  return [source[i] for i in range(len(source))]


def test_coco_splits_captions_ids_and_images(built):
  src = {s: tfds.data_source('beit3_coco_karpathy', split=s, data_dir=built['tfds_dir'],
                             download=False) for s in ('train', 'validation', 'test')}
  assert {s: len(v) for s, v in src.items()} == {'train': 3, 'validation': 1, 'test': 2}
  train = rows(src['train'])
  # train = Karpathy train + restval, in the JSON's order
  assert [int(r['image_id']) for r in train] == [1000, 1001, 1003]
  assert [int(r['index']) for r in train] == [0, 1, 2]
  assert train[1]['filename'] == b'COCO_val2014_000000001001.jpg'
  assert list(train[0]['captions']) == [f'coco image 0 caption {j}.'.encode() for j in range(5)]
  assert len(train[1]['captions']) == 6
  test = rows(src['test'])
  assert [int(r['image_id']) for r in test] == [1004, 1005]
  for r in train + test:
    i = int(r['image_id']) - 1000
    img = Image.open(io.BytesIO(r['image_bytes']))
    assert img.format == 'JPEG' and img.size == image_size(i)
    assert abs(int(np.asarray(img)[2, 2, 0]) - 30 * i) <= 3
  assert tfds.builder('beit3_coco_karpathy', data_dir=built['tfds_dir']).info.splits[
      'validation'].num_examples == 1


def test_flickr_splits_and_ids(built):
  b = tfds.builder('beit3_flickr30k_karpathy', data_dir=built['tfds_dir'])
  assert {s: int(i.num_examples) for s, i in b.info.splits.items()} == {
      'train': 2, 'validation': 1, 'test': 1}
  test = rows(b.as_data_source('test'))
  assert int(test[0]['image_id']) == 3 and test[0]['filename'] == b'503.jpg'
  assert test[0]['captions'][4] == b'flickr 3 says 4'
  assert Image.open(io.BytesIO(test[0]['image_bytes'])).size == image_size(3)


def test_open_source_and_prepare_reuses(built, capsys):
  src = tfds_sources.open_source('beit3_coco_karpathy', 'test', built['tfds_dir'])
  assert len(src) == 2 and int(src[1]['index']) == 1
  again = kc.prepare('coco', None, built['data_dir'])  # no manual dir needed once built
  assert 'Reusing beit3_coco_karpathy' in capsys.readouterr().out
  assert again.data_dir == built['coco'].data_dir


def test_missing_image_names_path_and_layout(tmp_path):
  manual = make_coco(tmp_path / 'coco')
  os.remove(manual / 'val2014' / 'COCO_val2014_000000001004.jpg')
  with pytest.raises(kc.ManualFileError) as e:
    kc.prepare('coco', manual, str(tmp_path / 'data'))
  msg = str(e.value)
  assert str(manual / 'val2014' / 'COCO_val2014_000000001004.jpg') in msg
  assert 'images[4]' in msg and 'train2014/' in msg
  assert not os.path.exists(tmp_path / 'data' / 'tfds' / 'beit3_coco_karpathy' / '1.0.0'
                            / 'dataset_info.json')


def test_missing_or_bad_json_and_missing_manual_dir(tmp_path):
  manual = tmp_path / 'flickr'
  os.makedirs(manual / 'flickr30k-images')
  (manual / 'readme.txt').write_text('not the json')
  with pytest.raises(kc.ManualFileError, match='dataset_flickr30k.json') as e:
    kc.prepare('flickr30k', manual, str(tmp_path / 'data'))
  assert str(manual / 'dataset_flickr30k.json') in str(e.value)
  assert 'flickr30k-images/' in str(e.value)
  (manual / 'dataset_flickr30k.json').write_text('{"images": [\n  {"split": "train",}\n]}')
  with pytest.raises(kc.KarpathyFormatError, match=r'dataset_flickr30k.json:2:'):
    kc.prepare('flickr30k', manual, str(tmp_path / 'data'))
  (manual / 'dataset_flickr30k.json').write_text(json.dumps({'images': [{'split': 'dev'}]}))
  with pytest.raises(kc.KarpathyFormatError, match=r"images\[0\]: unknown split 'dev'"):
    kc.prepare('flickr30k', manual, str(tmp_path / 'data'))
  with pytest.raises(kc.ManualFileError, match='manual dir'):
    kc.prepare('coco', tmp_path / 'nowhere', str(tmp_path / 'data'))
  with pytest.raises(kc.ManualFileError, match='no manual_dir'):
    kc.prepare('coco', None, str(tmp_path / 'data'))
  with pytest.raises(ValueError, match='Unknown Karpathy'):
    kc.prepare('coco2017', manual, str(tmp_path / 'data'))
