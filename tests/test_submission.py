"""mode=submit: the files the evaluation servers accept, as unilm writes them. VQA gives one
{question_id, answer} per question, the answer the arg-max of the model's logits, also for
questions without answers; captioning gives one {image_id, caption} per image, the caption the
beam search's; the job writes <workdir>/submit_<task>_<split>.json and never overwrites it;
tasks without a server file are refused by name."""

import json
import os

import jax
import numpy as np
import pytest
from flax.core import meta

import train_fixtures as fx
from beit3_jax import defaults, params_io, sharding
from beit3_jax.data import finetuning as ft_data
from beit3_jax.data import image_ops, synthetic_world
from beit3_jax.data import text as text_lib
from beit3_jax.data.builtin import prepare_builtin
from beit3_jax.jobs import finetuning
from beit3_jax.tasks import base, captioning, vqa
from beit3_jax.tasks.captioning import generate_captions

pytestmark = pytest.mark.usefixtures('fast_compile')

L = fx.TEXT_LEN
ANSWERS = ('yes', 'no', 'red', 'blue', 'two', 'three')


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  rng = np.random.default_rng(0)
  corpus = [synthetic_world.text_corpus_sentence(rng) for _ in range(300)]
  path = str(tmp_path_factory.mktemp('spm') / 'tiny.spm')
  text_lib.save_spm(text_lib.train_spm(corpus, vocab_size=fx.VOCAB - 2), path)
  return path


def _config(task, **data):
  config = defaults.finetune_config(task)
  config.model = fx.model_config(normalize_output=False)
  config.data.text_len = L
  config.data.read_threads = 2
  config.data.update(data)
  config.batch_size = 8
  config.mesh_shape = (-1, 1, 1)
  config.captioning.update(beam_size=2, max_len=6)
  return config


def _noisy_params(objective, seed):
  """Fresh params plus N(0, 0.3) noise, so that the arg-max differs between examples."""
  params = meta.unbox(objective.init_params(jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(
      np.float32) for x in leaves])


def _image(rng):
  return rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)


def test_vqa_submission_answers_every_question_with_the_arg_max(spm):
  config = _config('vqa')
  config.answers = ANSWERS
  rng = np.random.default_rng(0)
  questions = [f'what colour is the {w} ?' for w in ('circle', 'square', 'star', 'cross',
                                                    'ring', 'dot', 'bar', 'moon', 'sun')]
  # test-dev style: no answers; the last example holds two questions with a list of ids.
  source = [{'image': _image(rng), 'question': q.encode(), 'question_id': np.int64(1000 + i)}
            for i, q in enumerate(questions[:7])]
  source.append({'image': _image(rng), 'question': [q.encode() for q in questions[7:]],
                 'question_id': np.array([7, 8], np.int64)})
  fields = {**vqa.TASK.default_fields, 'question': 'question'}
  objective = vqa.TASK.objective(config)
  tok = text_lib.TextTokenizer.from_file(spm)
  sub = vqa.TASK.submission(config, objective, source, tok, fields, 'test')
  assert sub.file_name == 'submit_vqav2_test.json' and sub.key == 'question_id'
  params = _noisy_params(objective, 1)
  got = sub.predict(params, sharding.make_mesh((-1, 1, 1)))

  assert [set(e) for e in got] == [{'question_id', 'answer'}] * 9
  assert [e['question_id'] for e in got] == [1000 + i for i in range(7)] + [7, 8]
  assert all(type(e['question_id']) is int and type(e['answer']) is str for e in got)
  json.dumps(got)   # every value is JSON-ready
  inputs = ft_data.FinetuneInputs.from_config(config, train=False)
  images = np.stack([ft_data.view(inputs, e['image'], None) for e in source[:7]]
                    + [ft_data.view(inputs, source[7]['image'], None)] * 2)
  ids, pad = tok.encode_batch(questions, L)
  logits = jax.jit(lambda p: objective.apply(p, None, False, images=objective.images(images),
                                             text_ids=ids, text_padding_mask=pad))(params)
  want = [ANSWERS[j] for j in np.argmax(np.asarray(logits), -1)]
  assert [e['answer'] for e in got] == want
  assert len(set(want)) > 1   # the check above tells answers apart


def test_vqa_submission_names_a_missing_question_id(spm):
  config = _config('vqa')
  config.answers = ANSWERS
  source = [{'image': _image(np.random.default_rng(0)), 'question': b'what ?'}]
  objective = vqa.TASK.objective(config)
  sub = vqa.TASK.submission(config, objective, source, text_lib.TextTokenizer.from_file(spm),
                            {**vqa.TASK.default_fields, 'question': 'question'}, 'test')
  with pytest.raises(ValueError, match=r"Example 0 of 'test'.*data\.fields\.question_id"):
    sub.predict(meta.unbox(objective.init_params(jax.random.key(0))),
                sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def test_captioning_submission_gives_the_generated_captions(spm):
  config = _config('captioning', source='tfds:beit3_coco_karpathy')
  config.batch_size = 4
  rng = np.random.default_rng(3)
  source = [{'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             'image_id': np.int64(391895 + 7 * i)} for i in range(5)]
  source[1]['captions'] = [b'a red circle']    # references, if any, are not read
  objective = captioning.TASK.objective(config)
  tok = text_lib.TextTokenizer.from_file(spm)
  sub = captioning.TASK.submission(config, objective, source, tok,
                                   dict(captioning.TASK.default_fields), 'test')
  assert sub.file_name == 'submit_coco_captioning_test.json' and sub.key == 'image_id'
  params = _noisy_params(objective, 2)
  got = sub.predict(params, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))

  assert [e['image_id'] for e in got] == [391895 + 7 * i for i in range(5)]
  assert all(set(e) == {'image_id', 'caption'} and type(e['image_id']) is int
             and type(e['caption']) is str for e in got)
  images = image_ops.normalize(np.stack([e['image'] for e in source]))
  tokens = np.asarray(generate_captions(params, config.model, images, tok.bos_id, tok.eos_id,
                                        tok.pad_id, tok.mask_id, 6, 2, 0.6))
  assert [e['caption'] for e in got] == [captioning.decode_tokens(tok, t) for t in tokens]
  assert any(e['caption'] for e in got)


def test_submission_file_names_follow_unilm():
  assert base.submission_file_name('vqav2', 'test') == 'submit_vqav2_test.json'
  assert base.submission_file_name('vqav2', 'test[:100]') == 'submit_vqav2_test_100.json'
  assert captioning.submission_prefix('beit3_nocaps') == 'nocaps'
  assert captioning.submission_prefix('builtin:images') == 'captioning'
  assert base.json_id(b'abc', 'image_id', 0) == 'abc'
  with pytest.raises(ValueError, match="Example 4: 'image_id'"):
    base.json_id(np.zeros(2), 'image_id', 4)


@pytest.fixture(scope='module')
def builtin(tmp_path_factory):
  root = tmp_path_factory.mktemp('builtin')
  return root, prepare_builtin(str(root), image_size=32, verbose=False,
                               num_examples={'train': 4, 'validation': 6, 'test': 0})


def _builtin_config(task, root, built, spm, workdir=None):
  """mode=submit on the built-in data's validation split, init_from random params saved in
  `workdir` (None: none)."""
  config = _config(task, data_dir=str(root), source=built.names['images'],
                   builtin_image_size=32, spm_path=spm, eval_split='validation')
  config.data.fields.image_id = 'index'
  config.mode = 'submit'
  if workdir is None:
    return config
  objective = finetuning.tasks.get(task).objective(config)
  params = _noisy_params(objective, 4)
  config.init_from = str(params_io.save_params(os.path.join(workdir, 'init'), params,
                                               config.model, task=task, head_sizes={}))
  return config


def test_submit_mode_writes_the_file_once(builtin, spm, tmp_path, capsys):
  root, built = builtin
  workdir = tmp_path / 'run'
  config = _builtin_config('captioning', root, built, spm, str(tmp_path))
  got = finetuning.run(config, str(workdir))
  path = workdir / 'submit_captioning_validation.json'
  assert got['submission'] == str(path) and got['entries'] == 6 and got['step'] == 0
  assert f'Wrote 6 predictions to {path}' in capsys.readouterr().out
  entries = json.loads(path.read_text())
  assert [e['image_id'] for e in entries] == list(range(6))
  assert all(isinstance(e['caption'], str) for e in entries)

  path.write_text('[] mine')
  with pytest.raises(finetuning.SubmissionExistsError, match='never overwrites'):
    finetuning.run(config, str(workdir))
  assert path.read_text() == '[] mine'

  # Ids that repeat (here the class label as the id): only the first entry of each is kept.
  tfds_dir, name, _ = finetuning.resolve_source(config.data)
  source = finetuning.open_split(name, 'validation', 'data.eval_split', tfds_dir)
  labels = [int(source[i]['label']) for i in range(len(source))]
  assert len(set(labels)) < len(labels)
  config.data.fields.image_id = 'label'
  finetuning.run(config, str(tmp_path / 'by_label'))
  by_label = json.loads((tmp_path / 'by_label' / path.name).read_text())
  first = {}
  for label, entry in zip(labels, entries):
    first.setdefault(label, entry['caption'])
  assert by_label == [{'image_id': k, 'caption': v} for k, v in first.items()]


def test_submit_mode_refuses_a_task_without_a_server_file(builtin, spm, tmp_path):
  root, built = builtin
  config = _builtin_config('retrieval', root, built, spm)
  with pytest.raises(defaults.ConfigError, match="task 'retrieval' has no evaluation-server"):
    finetuning.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
