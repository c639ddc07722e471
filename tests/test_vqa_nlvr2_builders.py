"""VQAv2 and NLVR2 TFDS builders over tiny official-format files (beit3_jax.data.builders.vqa_nlvr2)."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import paths
from beit3_jax.data.builders import vqa_nlvr2 as vn
from beit3_jax.tasks import metrics


def _image(path, colour, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', (4, 4), colour).save(path, format=fmt)


def _answers(*pairs):
  out = []
  for answer, n in pairs:
    out += [answer] * n
  assert len(out) == 10
  return [{'answer': a, 'answer_confidence': 'yes', 'answer_id': i + 1} for i, a in enumerate(out)]


# (question_id, image_id, question, multiple_choice_answer, answers)
TRAIN = [
    (1, 11, 'How many dogs?', 'Two', _answers(('2', 6), ('3', 3), ('4', 1))),
    (2, 11, 'Is it red?', 'yes', _answers(('yes', 10))),
    (3, 12, 'What colour?', 'Red.', _answers(('red', 2), ('blue', 8))),
    (4, 12, 'What is it?', 'the dog', _answers(('cat', 10))),  # no in-vocabulary answer
]
VAL = [
    (5, 21, 'Is it blue?', 'yes', _answers(('yes', 4), ('no', 6))),
    (6, 22, 'How many?', '2', _answers(('2', 1), ('two', 9))),
    (7, 22, 'Which colour?', 'blue', _answers(('blue', 10))),
]
TEST = [(8, 31, 'Where?'), (9, 32, 'Why?')]


def _write_vqa(root):
  def questions(rows):
    return {'questions': [{'question_id': r[0], 'image_id': r[1], 'question': r[2]}
                          for r in rows]}

  def annotations(rows):
    return {'annotations': [{'question_id': r[0], 'image_id': r[1], 'question_type': 'x',
                             'answer_type': 'other', 'multiple_choice_answer': r[3],
                             'answers': r[4]} for r in rows]}

  for split, rows in (('train2014', TRAIN), ('val2014', VAL), ('test2015', TEST)):
    with open(os.path.join(root, f'v2_OpenEnded_mscoco_{split}_questions.json'), 'w') as f:
      json.dump(questions(rows), f)
    if split != 'test2015':
      with open(os.path.join(root, f'v2_mscoco_{split}_annotations.json'), 'w') as f:
        json.dump(annotations(rows), f)
    for r in rows:
      _image(vn.coco_image_path(root, split, r[1]), (r[1] % 256, 0, 0), 'JPEG')


NLVR2 = {
    'train.json': [('train-10171-0-0', 'Two dogs.', 'True', '7'),
                   ('train-10171-0-1', 'No dogs.', 'False', '7'),
                   ('train-20-1-0', 'A cat.', 'False', '3')],
    'dev.json': [('dev-5-0-0', 'Red.', 'True', None)],
    'test1.json': [('test1-9-2-3', 'Blue.', 'False', None)],
}


def _nlvr2_image_path(root, split_dir, identifier, directory, side):
  pair = identifier.rsplit('-', 1)[0]
  folder = (os.path.join(root, 'images', 'train', directory) if split_dir == 'train'
            else os.path.join(root, split_dir))
  return os.path.join(folder, f'{pair}-img{side}.png')


def _write_nlvr2(root):
  for file, rows in NLVR2.items():
    split_dir = file[:-len('.json')]
    with open(os.path.join(root, file), 'w') as f:
      for ident, sentence, label, directory in rows:
        record = {'identifier': ident, 'sentence': sentence, 'label': label,
                  'left_url': 'http://x/l.jpg', 'right_url': 'http://x/r.jpg'}
        if directory is not None:
          record['directory'] = directory
        f.write(json.dumps(record) + '\n')
        for side in (0, 1):
          _image(_nlvr2_image_path(root, split_dir, ident, directory, side),
                 (10 * side, 20, 30), 'PNG')


@pytest.fixture(scope='module')
def vqa(tmp_path_factory):
  root = tmp_path_factory.mktemp('vqa_manual')
  _write_vqa(str(root))
  data_dir = str(tmp_path_factory.mktemp('vqa_data'))
  builder = vn.prepare('vqav2', str(root), data_dir, min_count=1, num_holdout_images=1)
  return builder, data_dir, str(root)


def _read(name, split, data_dir):
  source = tfds.data_source(name, split=split, data_dir=paths.tfds_dir(data_dir), download=False)
  return [source[i] for i in range(len(source))]


def test_vqa_vocabulary(vqa):
  builder, _, _ = vqa
  vocab = vn.load_answer_vocabulary(builder)
  majority = [r[3] for r in TRAIN + VAL]
  assert vocab == metrics.build_answer_vocabulary(majority, min_count=1)
  assert vocab == ['2', 'yes', 'red', 'dog', 'blue']  # normalised, first-occurrence order
  assert vn.load_answer_vocabulary(builder.data_dir) == vocab
  assert builder.builder_config.name == 'min_count1_num_holdout_images1'


def test_vqa_recipe_fields_give_the_soft_scores(vqa):
  """The VQA recipe's data.fields on prepared examples: the transform's target vector holds
  unilm's soft score of every in-vocabulary answer (the training target and the metric)."""
  from beit3_jax.data import finetuning as ft_data
  from beit3_jax.tasks import recipes
  from beit3_jax.tasks import vqa as vqa_task

  class Tok:
    def encode_sequence(self, text, max_len):
      return np.zeros((max_len,), np.int32), np.zeros((max_len,), bool)

  builder, data_dir, _ = vqa
  vocab = vn.load_answer_vocabulary(builder)
  f = recipes.vqa('base', vn.vocabulary_path(builder)).data.fields
  cfg = ft_data.FinetuneInputs(image_size=32, train=False, text_len=8)
  transform = vqa_task.transform(cfg, Tok(), vocab, f.image, f.question, f.answer,
                                 f.answer_ids, f.answer_scores)
  rows = {r[0]: r for r in TRAIN + VAL}
  examples = _read(f'beit3_vqav2/{builder.builder_config.name}', 'train', data_dir)
  for e in examples:
    expected = metrics.answer_scores([a['answer'] for a in rows[int(e['question_id'])][4]], vocab)
    out = transform(e, np.random.default_rng(0))
    assert {vocab[i]: float(v) for i, v in enumerate(out['answer_scores']) if v} == (
        pytest.approx(expected))


def test_vqa_splits_and_scores(vqa):
  builder, data_dir, _ = vqa
  name = f'beit3_vqav2/{builder.builder_config.name}'
  vocab = vn.load_answer_vocabulary(builder)
  held = vn.holdout_image_ids([21, 22, 22], 1)
  assert len(held) == 1
  train, val = _read(name, 'train', data_dir), _read(name, 'validation', data_dir)
  val_ids = [r[0] for r in VAL if r[1] in held]
  assert [int(e['question_id']) for e in val] == val_ids
  # train: train2014 without question 4 (no answer in the vocabulary), then the other val images.
  assert [int(e['question_id']) for e in train] == [1, 2, 3] + [
      r[0] for r in VAL if r[1] not in held]
  rows = {r[0]: r for r in TRAIN + VAL}
  for e in train + val:
    r = rows[int(e['question_id'])]
    assert int(e['image_id']) == r[1]
    assert e['question'].decode() == r[2]
    assert e['multiple_choice_answer'].decode() == r[3]
    raw = [a['answer'] for a in r[4]]
    assert [a.decode() for a in e['answers']] == raw
    expected = metrics.answer_scores(raw, vocab)
    assert [vocab[i] for i in e['answer_ids']] == list(expected)
    np.testing.assert_allclose(e['answer_scores'], list(expected.values()), rtol=1e-6)
    split = 'train2014' if r in TRAIN else 'val2014'
    with open(vn.coco_image_path(vqa[2], split, r[1]), 'rb') as f:
      assert e['image_bytes'] == f.read()
  q1 = next(e for e in train if int(e['question_id']) == 1)
  assert [vocab[i] for i in q1['answer_ids']] == ['2']  # '3' and '4' are not in the vocabulary
  np.testing.assert_allclose(q1['answer_scores'], [1.0])
  q3 = next(e for e in train if int(e['question_id']) == 3)
  assert [vocab[i] for i in q3['answer_ids']] == ['red', 'blue']
  np.testing.assert_allclose(q3['answer_scores'], [0.6, 1.0], rtol=1e-6)
  # question 6: the raw 'two' x9 is not looked up normalised (as unilm), only '2' x1 counts.
  q6 = next(e for e in train + val if int(e['question_id']) == 6)
  np.testing.assert_allclose(q6['answer_scores'], [0.3], rtol=1e-6)


def test_vqa_test_split_has_no_answers(vqa):
  builder, data_dir, _ = vqa
  test = _read(f'beit3_vqav2/{builder.builder_config.name}', 'test', data_dir)
  assert [int(e['question_id']) for e in test] == [8, 9]
  for e in test:
    assert len(e['answers']) == 0 and len(e['answer_ids']) == 0 and len(e['answer_scores']) == 0
    assert e['multiple_choice_answer'] == b''
    assert Image.open(io.BytesIO(e['image_bytes'])).format == 'JPEG'


def test_vqa_reuse_and_normalize_answers(vqa, tmp_path, capsys):
  _, data_dir, root = vqa
  vn.prepare('beit3_vqav2', root, data_dir, min_count=1, num_holdout_images=1)
  assert 'Reusing' in capsys.readouterr().out
  b = vn.prepare('vqav2', root, str(tmp_path), min_count=1, num_holdout_images=0,
                 normalize_answers=True)
  vocab = vn.load_answer_vocabulary(b)
  train = _read(f'beit3_vqav2/{b.builder_config.name}', 'train', str(tmp_path))
  q6 = next(e for e in train if int(e['question_id']) == 6)
  assert [vocab[i] for i in q6['answer_ids']] == ['2']  # 'two' x9 + '2' x1 -> 10 x '2'
  np.testing.assert_allclose(q6['answer_scores'], [1.0])
  assert b.info.splits.keys() >= {'train', 'test'} and 'validation' not in b.info.splits


def test_nlvr2(tmp_path):
  root = tmp_path / 'nlvr2'
  root.mkdir()
  _write_nlvr2(str(root))
  vn.prepare('nlvr2', str(root), str(tmp_path / 'data'))
  for split, file in (('train', 'train.json'), ('validation', 'dev.json'),
                      ('test', 'test1.json')):
    examples = _read('beit3_nlvr2', split, str(tmp_path / 'data'))
    rows = NLVR2[file]
    assert [e['identifier'].decode() for e in examples] == [r[0] for r in rows]
    for e, (ident, sentence, label, directory) in zip(examples, rows):
      assert e['statement'].decode() == sentence
      assert int(e['label']) == int(label == 'True')
      for side, key in ((0, 'image_a_bytes'), (1, 'image_b_bytes')):
        path = _nlvr2_image_path(str(root), file[:-5], ident, directory, side)
        with open(path, 'rb') as f:
          assert e[key] == f.read()
      assert e['image_a_bytes'] != e['image_b_bytes']


def test_missing_files_name_path_and_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match='v2_OpenEnded_mscoco_train2014_questions.json') as e:
    vn.prepare('vqav2', str(tmp_path), str(tmp_path / 'd1'))
  assert 'Expected VQAv2 manual dir layout' in str(e.value)
  with pytest.raises(FileNotFoundError, match='train.json') as e:
    vn.prepare('nlvr2', str(tmp_path), str(tmp_path / 'd2'))
  assert 'Expected NLVR2 manual dir layout' in str(e.value)
  root = tmp_path / 'nlvr2'
  root.mkdir()
  _write_nlvr2(str(root))
  missing = _nlvr2_image_path(str(root), 'dev', 'dev-5-0-0', None, 1)
  os.remove(missing)
  with pytest.raises(FileNotFoundError, match='dev.json:1: missing image') as e:
    vn.prepare('nlvr2', str(root), str(tmp_path / 'd3'))
  assert missing in str(e.value)


def test_malformed_lines_name_file_and_line(tmp_path):
  root = tmp_path / 'nlvr2'
  root.mkdir()
  _write_nlvr2(str(root))
  with open(root / 'dev.json', 'a') as f:
    f.write('{"identifier": "dev-6-0-0", "sentence": "x", "label": "True"}\n{not json\n')
  with pytest.raises(vn.AnnotationError, match=r'dev\.json:3: not valid JSON'):
    vn.prepare('nlvr2', str(root), str(tmp_path / 'd'))
  with open(root / 'test1.json', 'w') as f:
    f.write('{"identifier": "test1-1-0-0", "sentence": "x", "label": "maybe"}\n')
  with pytest.raises(vn.AnnotationError, match=r'test1\.json:1: label must be'):
    vn.read_nlvr2_lines(str(root / 'test1.json'))
  vqa_root = tmp_path / 'vqa'
  vqa_root.mkdir()
  _write_vqa(str(vqa_root))
  bad = vqa_root / 'v2_mscoco_val2014_annotations.json'
  bad.write_text('{\n"annotations": [\n,]}')
  with pytest.raises(vn.AnnotationError, match=r'val2014_annotations\.json:3: not valid JSON'):
    vn.prepare('vqav2', str(vqa_root), str(tmp_path / 'd2'), min_count=1)
