"""TFDS builders over the user's own files, built from small files the tests write."""

import csv
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import local_files


def write_image(path, value, fmt='PNG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture()
def images(tmp_path):
  for i in range(4):
    write_image(str(tmp_path / 'imgs' / f'{i}.png'), 40 * i)
  return tmp_path


def read(name, data_dir, split='train'):
  src = tfds.data_source(name, data_dir=os.path.join(data_dir, 'tfds'), split=split)
  return [src[i] for i in range(len(src))]


def test_jsonl_pairs_round_trip_and_empty_caption_counted(images):
  ann = images / 'train.jsonl'
  lines = [{'image': f'imgs/{i}.png', 'caption': f'caption {i}'} for i in range(4)]
  lines[2]['caption'] = '  '
  ann.write_text('\n'.join(json.dumps(x) for x in lines) + '\n')
  data_dir = str(images / 'data')
  report = local_files.build_image_text('my_pairs', {'train': str(ann)}, data_dir=data_dir)
  assert report.examples == {'train': 3} and report.skipped == {'empty caption': 1}
  rows = read('my_pairs', data_dir)
  assert [r['caption'] for r in rows] == [b'caption 0', b'caption 1', b'caption 3']
  pixels = np.asarray(Image.open(io.BytesIO(rows[1]['image_bytes'])))
  assert pixels.shape == (12, 10, 3) and pixels[0, 0, 0] == 40
  with pytest.raises(FileExistsError, match='overwrite'):
    local_files.build_image_text('my_pairs', {'train': str(ann)}, data_dir=data_dir)
  report = local_files.build_image_text('my_pairs', {'train': str(ann)}, data_dir=data_dir,
                                        overwrite=True)
  assert report.examples == {'train': 3}


def test_csv_and_coco_pairs(images):
  with open(images / 'val.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['image_path', 'text'])
    w.writerow(['imgs/0.png', 'a dark square'])
    w.writerow([str(images / 'imgs' / '3.png'), 'a light square'])  # absolute path
  coco = {'images': [{'id': 7, 'file_name': '1.png'}, {'id': 9, 'file_name': '2.png'}],
          'annotations': [{'image_id': 7, 'caption': 'one'}, {'image_id': 9, 'caption': 'two'},
                          {'image_id': 7, 'caption': 'uno'}]}
  (images / 'coco.json').write_text(json.dumps(coco))
  data_dir = str(images / 'data')
  report = local_files.build_image_text(
      'pairs_mixed', {'validation': str(images / 'val.csv')}, data_dir=data_dir)
  assert report.examples == {'validation': 2}
  report = local_files.build_image_text('coco_like', {'train': str(images / 'coco.json')},
                                        image_root=str(images / 'imgs'), data_dir=data_dir)
  assert report.examples == {'train': 3}
  rows = read('coco_like', data_dir)
  assert [r['caption'] for r in rows] == [b'one', b'two', b'uno']
  assert rows[2]['image_path'].decode().endswith('1.png')


@pytest.mark.parametrize('content, match', [
    ('{"image": "imgs/0.png", "caption": "ok"}\n{"image": "imgs/1.png", "caption": }\n',
     r'train.jsonl:2: not valid JSON'),
    ('{"image": "imgs/0.png", "caption": "ok"}\n{"image": "imgs/9.png", "caption": "x"}\n',
     r'train.jsonl:2: image file .*9.png does not exist'),
    ('{"img": "imgs/0.png", "caption": "ok"}\n', r'train.jsonl:1: no image field'),
])
def test_bad_jsonl_names_file_and_line(images, content, match):
  (images / 'train.jsonl').write_text(content)
  with pytest.raises(local_files.AnnotationError, match=match):
    local_files.build_image_text('bad', {'train': str(images / 'train.jsonl')},
                                 data_dir=str(images / 'data'))
  assert not os.path.exists(images / 'data' / 'tfds' / 'bad' / '1.0.0' / 'dataset_info.json')


def test_malformed_lines_are_skipped_and_counted_when_asked(images):
  lines = ['{"image": "imgs/0.png", "caption": "ok"}', '{"image": "imgs/1.png", "caption": }',
           '{"image": "imgs/9.png", "caption": "x"}', '{"img": "imgs/2.png", "caption": "y"}',
           '[1, 2]', '{"image": "imgs/3.png", "caption": "fine"}']
  (images / 'train.jsonl').write_text('\n'.join(lines) + '\n')
  report = local_files.build_image_text('lenient', {'train': str(images / 'train.jsonl')},
                                        data_dir=str(images / 'data'), on_bad_line='skip')
  assert report.examples == {'train': 2} and report.skipped == {'malformed annotation': 4}
  assert sorted(line.split(': ')[0].rsplit(':', 1)[1] for line in report.bad_lines) == \
      ['2', '3', '4', '5']   # file:line of each
  with open(os.path.join(report.data_dir, 'build_report.json')) as f:
    assert json.load(f)['skipped'] == {'malformed annotation': 4}
  (images / 'bad.csv').write_text('image,caption\nimgs/0.png,fine\nimgs/1.png,too,many\n')
  report = local_files.BuildReport('x', '')
  assert len(local_files.read_image_text(str(images / 'bad.csv'), report=report,
                                         on_bad_line='skip')) == 1
  assert report.bad_lines[0].startswith(str(images / 'bad.csv') + ':3')


def test_bad_csv_and_missing_files(images):
  (images / 'bad.csv').write_text('image,caption\nimgs/0.png,fine\nimgs/1.png,too,many\n')
  with pytest.raises(local_files.AnnotationError, match=r'bad.csv:3'):
    local_files.read_image_text(str(images / 'bad.csv'))
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    local_files.read_image_text(str(images / 'nope.jsonl'))
  (images / 'x.txt').write_text('hello')
  with pytest.raises(local_files.AnnotationError, match='unknown annotation format'):
    local_files.read_image_text(str(images / 'x.txt'))
  with pytest.raises(ValueError, match='lower-case'):
    local_files.build_text('My-Text', {'train': [str(images / 'x.txt')]},
                           data_dir=str(images / 'data'))


def test_class_folders(tmp_path):
  for split, n in (('train', 3), ('val', 1)):
    for cls, value in (('cat', 10), ('dog', 200)):
      for i in range(n):
        write_image(str(tmp_path / split / cls / f'{i}.jpg'), value, fmt='JPEG')
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  report = local_files.build_image_folders(
      'pets', {'train': str(tmp_path / 'train'), 'validation': str(tmp_path / 'val')},
      data_dir=str(tmp_path / 'data'))
  assert report.class_names == ['cat', 'dog']
  assert report.examples == {'train': 6, 'validation': 2}
  rows = read('pets', str(tmp_path / 'data'))
  assert [int(r['label']) for r in rows] == [0, 0, 0, 1, 1, 1]
  (tmp_path / 'other' / 'bird').mkdir(parents=True)
  with pytest.raises(local_files.AnnotationError, match='differ'):
    local_files.build_image_folders('pets2', {'train': str(tmp_path / 'train'),
                                              'validation': str(tmp_path / 'other')},
                                    data_dir=str(tmp_path / 'data'))


def test_text_files(tmp_path):
  (tmp_path / 'a.txt').write_text('first line\n\n  second line  \n')
  (tmp_path / 'b.txt').write_text('third\n')
  report = local_files.build_text('corpus', {'train': [str(tmp_path / 'a.txt'),
                                                       str(tmp_path / 'b.txt')]},
                                  data_dir=str(tmp_path / 'data'))
  assert report.examples == {'train': 3} and report.skipped == {'empty line': 1}
  assert [r['text'] for r in read('corpus', str(tmp_path / 'data'))] == [
      b'first line', b'second line', b'third']
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    local_files.build_text('corpus2', {'train': [str(tmp_path / 'missing.txt')]},
                           data_dir=str(tmp_path / 'data'))
