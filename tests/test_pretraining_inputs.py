"""The three pretraining streams on a tiny build of the built-in data set."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from beit3_jax.data import local_files, masking, pipeline, pretraining, schema, synthetic_world
from beit3_jax.data import text as text_lib
from beit3_jax.data.builders import synthetic_world_builder

CFG = pretraining.PretrainInputs(image_size=64, tokenizer_image_size=32, patch_size=16,
                                 text_len=24, image_mask=masking.BlockMaskConfig(0.4, min_block=4))
BATCH = {'image': 4, 'text': 6, 'pair': 4}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  builders = synthetic_world_builder.prepare(
      data_dir=data_dir, which=('images', 'text'),
      num_examples={'train': 16, 'validation': 4, 'test': 4})
  images = builders['images'].as_data_source('train')
  texts = builders['text'].as_data_source('train')
  rng = np.random.default_rng(0)
  corpus = [synthetic_world.text_corpus_sentence(rng) for _ in range(400)]
  tokenizer = text_lib.TextTokenizer.from_proto(text_lib.train_spm(corpus, vocab_size=100))
  return {'image': images, 'text': texts, 'pair': images}, tokenizer


def test_streams_fit_the_schema_with_exact_mask_counts(world):
  sources, tokenizer = world
  mixture = pretraining.make_mixture(CFG, tokenizer, sources, BATCH, seed=0,
                                     process_index=0, process_count=1)
  for _ in range(2):
    batch = next(mixture)
    for stream in ('image', 'text', 'pair'):
      # The host view: the tokenizer's where the stream has visual tokens, else the model's.
      sizes = dict(B=BATCH[stream], H=64, W=64, T=32, V=32 if stream == 'image' else 64, N=16,
                   L=24)
      schema.check(stream, batch[stream], sizes)
    assert (batch['image']['image_mask'].sum(1) == 6).all()  # round(0.4 * 16)
    assert not batch['pair']['image_mask'].any()
    for stream, ratio in (('text', 0.15), ('pair', 0.5)):
      b = batch[stream]
      assert (b['text_ids'][:, 0] == tokenizer.bos_id).all()
      real = ~b['text_padding_mask'] & ~np.isin(b['text_targets'], list(tokenizer.special_ids))
      want = [masking.num_text_masked(n, ratio) for n in real.sum(1)]
      np.testing.assert_array_equal(b['text_mask'].sum(1), want)
      assert not (b['text_mask'] & ~real).any()
      changed = b['text_ids'] != b['text_targets']
      assert not (changed & ~b['text_mask']).any()
  assert mixture.skipped() == {'image': {}, 'text': {}, 'pair': {}}


def test_resume_gives_the_same_next_batch(world):
  sources, tokenizer = world
  make = lambda: pretraining.make_mixture(CFG, tokenizer, sources, BATCH, seed=1,
                                          process_index=0, process_count=1)
  straight = make()
  batches = [next(straight) for _ in range(4)]
  partial = make()
  next(partial), next(partial)
  resumed = make()
  resumed.set_state(json.loads(json.dumps(partial.get_state())))
  for expected in batches[2:]:
    jax.tree.map(np.testing.assert_array_equal, expected, next(resumed))


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path, world):
  _, tokenizer = world
  lines = []
  for i in range(10):
    path = tmp_path / f'{i}.png'
    if i in (3, 7):
      path.write_bytes(b'not an image at all')
    else:
      Image.fromarray(np.full((40, 50, 3), 20 * i, np.uint8)).save(path)
    lines.append(json.dumps({'image': path.name, 'caption': f'a picture number {i}'}))
  (tmp_path / 'train.jsonl').write_text('\n'.join(lines))
  local_files.build_image_text('pairs_with_bad', {'train': str(tmp_path / 'train.jsonl')},
                               data_dir=str(tmp_path / 'data'))
  source = tfds.data_source('pairs_with_bad', data_dir=str(tmp_path / 'data' / 'tfds'),
                            split='train')
  mixture = pretraining.make_mixture(CFG, tokenizer, {'pair': source}, {'pair': 2}, seed=0,
                                     process_index=0, process_count=1)
  for _ in range(10):  # 10 batches of 2 = two epochs: the two corrupt ones twice, and any
    next(mixture)     # replacement that drew one of them again
  assert mixture.skipped()['pair']['corrupt image'] >= 4
  strict = pretraining.make_mixture(CFG, tokenizer, {'pair': source}, {'pair': 10}, seed=0,
                                    process_index=0, process_count=1, on_bad_example='stop')
  with pytest.raises(pipeline.BadExampleError,
                     match=r"Stream 'pair': example \d+ \(record [37] of .*pairs_with_bad.*"
                           r'corrupt image'):
    next(strict)


def test_unknown_stream_and_bad_sizes():
  with pytest.raises(ValueError, match='multiple'):
    pretraining.PretrainInputs(image_size=60, tokenizer_image_size=32, patch_size=16, text_len=8)


def test_nested_fields_of_real_data_sets(world):
  """A coco_captions-like example: captions under captions/text, a grayscale image."""
  _, tokenizer = world
  example = {'image': np.full((48, 40, 1), 128, np.uint8),
             'captions': {'id': np.arange(2), 'text': [b'a grey picture', b'something grey']}}
  out = pretraining.pair_transform(CFG, tokenizer, caption_field='captions/text')(
      example, np.random.default_rng(0))
  assert out['image'].shape == (64, 64, 3) and out['text_ids'][0] == tokenizer.bos_id
  with pytest.raises(KeyError, match="no field 'captions/txt'"):
    pretraining.pair_transform(CFG, tokenizer, caption_field='captions/txt')(
        example, np.random.default_rng(0))


def test_two_hosts_share_an_epoch_of_a_tfds_stream_exactly(world):
  sources, _ = world
  text_source = sources['text']  # 16 examples, each with its 'index'
  seen = []
  for host in (0, 1):
    stream = pipeline.Stream(text_source, lambda ex, rng: {'index': np.int64(ex['index'])},
                             global_batch=8, seed=3, num_epochs=1, process_index=host,
                             process_count=2)
    seen += [int(i) for b in stream.iterator() for i in b['index']]
  assert sorted(seen) == list(range(len(text_source)))


def test_data_state_round_trips_through_an_orbax_checkpoint(world, tmp_path):
  import orbax.checkpoint as ocp
  sources, tokenizer = world
  make = lambda: pretraining.make_mixture(CFG, tokenizer, sources, BATCH, seed=2,
                                          process_index=0, process_count=1)
  straight = make()
  expected = [next(straight) for _ in range(3)][2]
  partial = make()
  next(partial), next(partial)
  with ocp.CheckpointManager(str(tmp_path / 'ckpt')) as manager:
    manager.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(partial.get_state())))
    manager.wait_until_finished()
    state = manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
  resumed = make()
  resumed.set_state(state)
  jax.tree.map(np.testing.assert_array_equal, expected, next(resumed))
