"""Retrieval and captioning training read one example per (image, caption) pair (unilm's
training sets), so an epoch covers every caption once; `data.caption_pairs=False` gives one
example per image with one of its captions drawn at random. Evaluation is unchanged."""

import collections
import pickle

import ml_collections
import numpy as np
import pytest

from beit3_jax import tasks
from beit3_jax.data import finetuning as ft_data
from beit3_jax.data import tfds_sources
from beit3_jax.data.builtin import prepare_builtin
from beit3_jax.data.text import TextTokenizer
from beit3_jax.defaults import ConfigError
from beit3_jax.jobs import finetuning
from beit3_jax.tasks.recipes import demo_config

# Captions per image of the in-memory source: 1 to 5, and an image whose only caption is blank.
COUNTS = (3, 1, 5, 2, 4, 0, 1)
PAIRS = sum(COUNTS)        # 16: epochs of whole batches of 4 or 8
TEXT_LEN = 12


class CharTokenizer:
  """<s> (0), the characters' code points, </s> (2), pad (1): texts read back exactly."""
  mask_id = 3
  vocab_size = 200

  def encode_sequence(self, text, length):
    codes = [0] + [ord(c) for c in text][:length - 2] + [2]
    ids = np.ones(length, np.int64)
    ids[:len(codes)] = codes
    return ids, np.arange(length) >= len(codes)


def decode(ids) -> str:
  ids = list(ids)
  return ''.join(chr(c) for c in ids[1:ids.index(2)])


def _source():
  """Image i: constant value 10 i + 5; its captions 'i<i>c<j>' (bytes, as TFDS gives them)."""
  out = []
  for i, n in enumerate(COUNTS):
    captions = [f'i{i}c{j}'.encode() for j in range(n)] or [b'  ']
    out.append({'image': np.full((20, 24, 3), 10 * i + 5, np.uint8), 'captions': captions})
  return out


def _config(task, batch_size, pairs=True):
  config = demo_config(task)
  config.model.img_size = 16
  config.data.text_len = TEXT_LEN
  config.data.read_threads = 1
  config.data.workers = 0
  config.data.caption_pairs = pairs
  config.batch_size = batch_size
  return config


def _epoch(task, config, source, train=True):
  """[(image index, caption)] of the first epoch of `make_data`'s stream, and the stream."""
  data = finetuning.make_data(config, tasks.get(task), source, train, seed=3,
                              text_tokenizer=CharTokenizer())
  stream = data.streams[task]
  steps = -(-len(stream.source) // stream.global_batch)
  rows = []
  for _ in range(steps):
    batch = next(data)[task]
    texts = batch['text_targets'] if task == 'captioning' else batch['text_ids']
    for k, (image, ids) in enumerate(zip(batch['image'], texts)):
      if not train and not batch['valid'][k]:
        continue
      value = float(image.mean())
      assert abs(value - np.round((value - 5) / 10) * 10 - 5) < 1.5   # a constant image
      rows.append((int(np.round((value - 5) / 10)), decode(ids)))
  data.close()
  return rows, stream


@pytest.mark.parametrize('task', ['retrieval', 'captioning'])
def test_a_training_epoch_has_every_image_caption_pair_once(task):
  rows, stream = _epoch(task, _config(task, 4), _source())
  assert isinstance(stream.source, ft_data.CaptionPairs)
  assert len(stream.source) == PAIRS
  want = [(i, f'i{i}c{j}') for i, n in enumerate(COUNTS) for j in range(n)]
  assert sorted(rows) == sorted(want)
  # Images appear once per caption.
  assert collections.Counter(i for i, _ in rows) == {i: n for i, n in enumerate(COUNTS) if n}


@pytest.mark.parametrize('task', ['retrieval', 'captioning'])
def test_without_caption_pairs_an_epoch_has_one_entry_per_image(task):
  config = _config(task, len(COUNTS), pairs=False)
  rows, stream = _epoch(task, config, _source())
  assert stream.source is not None and not isinstance(stream.source, ft_data.CaptionPairs)
  assert len(rows) == len(COUNTS)
  # The image without a caption is skipped and replaced by another image's example.
  assert stream.source[5]['captions'] == [b'  ']
  for i, text in rows:
    assert text in {f'i{i}c{j}' for j in range(COUNTS[i])}
  assert len({i for i, _ in rows}) >= len(COUNTS) - 2


def test_evaluation_reads_each_image_once_with_pairs_on():
  rows, stream = _epoch('retrieval', _config('retrieval', 4), _source(), train=False)
  assert not isinstance(stream.source, ft_data.CaptionPairs)
  assert sorted(i for i, _ in rows) == [i for i, n in enumerate(COUNTS) if n]


def test_caption_pairs_must_be_a_bool():
  config = _config('retrieval', 4)   # a ConfigDict refuses 'yes'; a run's config.json may not
  config.data = ml_collections.ConfigDict({**config.data.to_dict(), 'caption_pairs': 'yes'})
  with pytest.raises(ConfigError, match='data.caption_pairs'):
    finetuning.make_data(config, tasks.get('retrieval'), _source(), True, 0, CharTokenizer())


def test_caption_pairs_elements_pickle_and_describe():
  source = _source()
  pairs = ft_data.CaptionPairs(source)
  assert len(pairs) == PAIRS
  assert pairs.pair(0) == (0, 0) and pairs.pair(3) == (1, 0) and pairs.pair(PAIRS - 1) == (6, 0)
  element = pairs[4]
  assert element['captions'] == ['i2c0'] and element['image'][0, 0, 0] == 25
  assert source[2]['captions'][1] == b'i2c1'                  # the source is left alone
  copy = pickle.loads(pickle.dumps(pairs))
  assert [copy[k]['captions'] for k in range(PAIRS)] == [pairs[k]['captions']
                                                         for k in range(PAIRS)]
  assert 'CaptionPairs(16 (example, caption) pairs of the 7 examples of' in str(pairs)
  with pytest.raises(IndexError):
    pairs[PAIRS]


def test_caption_pairs_of_a_nested_field_and_bad_input():
  # TFDS coco_captions keeps its captions at 'captions/text', beside their ids.
  source = [{'image': np.zeros((4, 4, 3), np.uint8),
             'captions': {'id': np.arange(n), 'text': np.array([f'{i}-{j}'.encode()
                                                               for j in range(n)])}}
            for i, n in enumerate((2, 3))]
  pairs = ft_data.CaptionPairs(source, 'captions/text')
  assert [pairs[k]['captions']['text'] for k in range(5)] == [
      ['0-0'], ['0-1'], ['1-0'], ['1-1'], ['1-2']]
  assert list(pairs[2]['captions']['id']) == [0, 1, 2]
  with pytest.raises(ValueError, match="field 'captions'"):
    ft_data.CaptionPairs([{'captions': ['']}])
  with pytest.raises(KeyError, match="'caption'"):
    ft_data.CaptionPairs(source, 'caption')
  with pytest.raises(ValueError, match='one per example'):
    ft_data.CaptionPairs(source, 'captions/text', counts=[2])


@pytest.fixture(scope='module')
def builtin(tmp_path_factory):
  root = tmp_path_factory.mktemp('builtin')
  return root, prepare_builtin(str(root / 'data'), image_size=32, verbose=False,
                               num_examples={'train': 6, 'validation': 4, 'test': 0})


@pytest.mark.parametrize('task', ['retrieval', 'captioning'])
def test_the_builtin_demo_data_trains_on_every_pair(task, builtin, capsys):
  root, built = builtin
  config = _config(task, 10)
  config.model.img_size = 32
  config.data.data_dir = str(root / 'data')
  config.data.source = built.names['images']
  config.data.spm_path = built.spm_path
  config.data.text_len = 24
  tfds_dir, name, spm_path = finetuning.resolve_source(config.data)
  source = tfds_sources.open_source(name, 'train', tfds_dir)
  tokenizer = finetuning.text_tokenizer(config, tasks.get(task), spm_path)
  capsys.readouterr()
  data = finetuning.make_data(config, tasks.get(task), source, True, 0, tokenizer)
  # The built-in captions are a fixed-length sequence (5 an image): counted without reading.
  assert 'Counted' not in capsys.readouterr().out
  assert len(data.streams[task].source) == 5 * len(source) == 30
  key = 'text_targets' if task == 'captioning' else 'text_ids'
  got = [tuple(ids) for _ in range(3) for ids in next(data)[task][key]]
  data.close()
  want = [tuple(tokenizer.encode_sequence(c.decode(), 24)[0])
          for i in range(len(source)) for c in source[i]['captions']]
  assert sorted(got) == sorted(want)


def test_a_variable_number_of_captions_is_counted_from_the_records(tmp_path, capsys):
  from test_karpathy_captions import make_coco   # COCO Karpathy files: 5 or 6 captions
  from beit3_jax.data.builders import karpathy_captions
  karpathy_captions.prepare('coco', make_coco(tmp_path / 'coco'), str(tmp_path / 'data'))
  source = tfds_sources.open_source('beit3_coco_karpathy', 'train',
                                    str(tmp_path / 'data' / 'tfds'))
  capsys.readouterr()
  pairs = ft_data.CaptionPairs(source)
  assert 'Counted 16 captions' in capsys.readouterr().out
  assert len(source) == 3 and len(pairs) == 16
  got = sorted(pairs[k]['captions'][0] for k in range(len(pairs)))
  assert got == sorted(ft_data.as_str(c).strip() for i in range(3)
                       for c in source[i]['captions'])
  assert ft_data.caption_counts(source).tolist() == [len(source[i]['captions'])
                                                     for i in range(3)]
