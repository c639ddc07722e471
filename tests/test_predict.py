"""`python -m beit3_jax.predict` end to end on tiny random models, and `convert to-flax --task`.

Each command runs through `predict.main([...])` on a params directory (the convert CLI's
format) or a training workdir of ours (run config + Orbax checkpoint), and its printed / saved
results are checked against the model applied directly: embeddings equal the model's outputs
(unit norm), retrieval rankings the argsort of the directly computed similarity, answers and
classes the argmax of the logits, captions `generate_captions` decoded.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

import train_fixtures as fx
from beit3_jax import convert, param_tree, params_io, predict, tasks, torch_files
from beit3_jax.data import image_ops, synthetic_world
from beit3_jax.data import text as text_lib
from beit3_jax.models import BEiT3, get_config, heads
from beit3_jax.tasks import vqa
from beit3_jax.tasks.captioning import generate_captions

pytestmark = pytest.mark.usefixtures('fast_compile')

N_IMAGES = 3
TEXTS = ('a red circle', 'two blue squares', 'a small green triangle', 'nothing at all')
ANSWERS = ('red', 'blue', 'green', 'yes', 'no')
CLASSES = ('cat', 'dog', 'bird', 'fish', 'frog', 'horse')


def random_params(abstract, seed=0):
  """Random float32 params of an abstract tree: N(0, 0.05), LayerNorm scales around 1."""
  rng = np.random.default_rng(seed)
  flat = param_tree.flatten(abstract)
  out = {}
  for path, a in flat.items():
    x = 0.05 * rng.standard_normal(a.shape)
    out[path] = (x + 1.0 if path.endswith('/scale') else x).astype(np.float32)
  return param_tree.unflatten(out)


def task_config(task):
  return fx.model_config(normalize_output=task not in ('classification', 'vqa'))


def task_params(task, head_sizes=None, seed=0):
  cfg = task_config(task)
  return cfg, random_params(tasks.get(task).abstract_params(cfg, head_sizes or {}), seed)


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  """A SentencePiece model of 100 pieces: 102 ids, the tiny models' vocab_size."""
  rng = np.random.default_rng(0)
  corpus = [synthetic_world.text_corpus_sentence(rng) for _ in range(400)] + list(TEXTS)
  path = str(tmp_path_factory.mktemp('spm') / 'tiny.spm')
  text_lib.save_spm(text_lib.train_spm(corpus, vocab_size=fx.VOCAB - 2), path)
  assert text_lib.TextTokenizer.from_file(path).vocab_size == fx.VOCAB
  return path


@pytest.fixture(scope='module')
def image_dir(tmp_path_factory):
  """N_IMAGES PNGs of other sizes than the model's input, and a file that is not an image."""
  folder = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(1)
  for i in range(N_IMAGES):
    pixels = rng.integers(0, 256, (40 + 7 * i, 50 - 3 * i, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f'img{i}.png')
  (folder / 'notes.txt').write_text('not an image')
  return str(folder)


def image_files(image_dir):
  return [os.path.join(image_dir, f'img{i}.png') for i in range(N_IMAGES)]


def inputs(image_dir, size=32, mean=image_ops.BEIT3_MEAN, std=image_ops.BEIT3_STD,
           crop_pct=0.0):
  """The model inputs of the test images, computed with image_ops directly."""
  out = []
  for p in image_files(image_dir):
    with open(p, 'rb') as f:
      image = image_ops.decode(f.read())
    out.append(image_ops.normalize(image_ops.eval_view(image, size, crop_pct, 'bicubic'), mean,
                                   std))
  return np.stack(out)


def texts_in(spm, texts, text_len):
  tok = text_lib.TextTokenizer.from_file(spm)
  pairs = [tok.encode_sequence(t, text_len) for t in texts]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def params_dir(tmp_path, task, head_sizes=None, seed=0):
  cfg, params = task_params(task, head_sizes, seed)
  path = tmp_path / f'{task}_params'
  params_io.save_params(path, params, cfg, task=task, head_sizes=head_sizes)
  return str(path), cfg, params


def training_workdir(tmp_path, task, params, cfg, **fields):
  """A fine-tuning workdir of ours: config.json (the run config) + checkpoints/3/state."""
  from beit3_jax.defaults import finetune_config
  run = finetune_config(task)
  run.model = cfg
  for k, v in fields.items():
    node, *path = k.split('.')
    target = run if not path else run[node]
    setattr(target, path[-1] if path else node, v)
  workdir = tmp_path / f'{task}_workdir'
  workdir.mkdir()
  (workdir / 'config.json').write_text(run.to_json_best_effort(indent=2))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(workdir / 'checkpoints' / '3' / 'state', {'params': params, 'step': np.int32(3)})
  return str(workdir)


def jitted(model, **kw):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, **kw))


def assert_unit_norm(x):
  np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- embed


def test_preprocessing_equals_image_ops(image_dir):
  got = predict.load_images(predict.list_images(image_dir), 32, (0.5,) * 3, (0.5,) * 3)
  assert got.dtype == np.float32 and got.shape == (N_IMAGES, 32, 32, 3)
  np.testing.assert_array_equal(got, inputs(image_dir))
  assert predict.list_images(image_dir) == image_files(image_dir)   # sorted, .txt left out


def test_embed_backbone(tmp_path, spm, image_dir, capsys):
  cfg, params = task_params('retrieval')
  path = str(tmp_path / 'backbone')
  params_io.save_params(path, params['beit3'], cfg)          # a plain backbone dir, as before
  out = str(tmp_path / 'emb.npz')
  assert predict.main(['embed', path, '--image', image_dir, '--text', TEXTS[0], '--text',
                       TEXTS[1], '--spm', spm, '--output', out, '--batch-size', '2']) == 0
  printed = capsys.readouterr().out
  assert 'encoder_out[:, 0]' in printed and 'backbone (no head)' in printed
  saved = np.load(out)
  assert str(saved['features_from']) == 'backbone_cls'
  fi, ft = saved['image_features'], saved['text_features']
  assert fi.shape == (N_IMAGES, cfg.embed_dim) and fi.dtype == np.float32
  assert ft.shape == (2, cfg.embed_dim) and ft.dtype == np.float32
  assert_unit_norm(fi), assert_unit_norm(ft)

  model = BEiT3(cfg)
  x = jitted(model)(params['beit3'], None, None, inputs(image_dir))['encoder_out'][:, 0]
  # Default text length: 64 capped at what the position table holds (24 - 2).
  ids, pad = texts_in(spm, TEXTS[:2], cfg.max_text_positions - 2)
  y = jitted(model)(params['beit3'], ids, pad)['encoder_out'][:, 0]
  np.testing.assert_allclose(fi, x / np.linalg.norm(x, axis=-1, keepdims=True), atol=2e-6)
  np.testing.assert_allclose(ft, y / np.linalg.norm(y, axis=-1, keepdims=True), atol=2e-6)
  np.testing.assert_allclose(saved['similarity'], fi @ ft.T, atol=1e-6)


@pytest.fixture(scope='module')
def retrieval_dir(tmp_path_factory):
  return params_dir(tmp_path_factory.mktemp('retrieval'), 'retrieval', seed=3)


def test_embed_and_retrieve_with_a_retrieval_model(retrieval_dir, spm, image_dir, tmp_path,
                                                   capsys):
  path, cfg, params = retrieval_dir
  texts_file = tmp_path / 'texts.txt'
  texts_file.write_text('\n'.join(TEXTS) + '\n\n')             # a blank line is skipped
  text_len = 12
  ids, pad = texts_in(spm, TEXTS, text_len)
  direct = jitted(heads.RetrievalModel(cfg))(params, inputs(image_dir), ids, pad)
  fi, ft = np.asarray(direct['image_features']), np.asarray(direct['text_features'])

  out = str(tmp_path / 'emb.npz')
  assert predict.main(['embed', path, '--image', image_dir, '--texts', str(texts_file),
                       '--spm', spm, '--text-len', str(text_len), '--output', out]) == 0
  assert "retrieval heads' l2-normalised" in capsys.readouterr().out
  saved = np.load(out)
  assert str(saved['features_from']) == 'retrieval_heads'
  assert saved['image_features'].shape == fi.shape and saved['text_features'].shape == ft.shape
  assert_unit_norm(saved['image_features']), assert_unit_norm(saved['text_features'])
  np.testing.assert_allclose(saved['image_features'], fi, atol=1e-6)
  np.testing.assert_allclose(saved['text_features'], ft, atol=1e-6)

  out = str(tmp_path / 'ret.json')
  k = 2
  assert predict.main(['retrieve', path, '--images', image_dir, '--texts', str(texts_file),
                       '--spm', spm, '--text-len', str(text_len), '--top-k', str(k),
                       '--output', out]) == 0
  printed = capsys.readouterr().out
  assert 'text -> images (top 2' in printed and 'image -> texts (top 2' in printed
  result = json.loads(open(out).read())
  assert result['image_files'] == image_files(image_dir) and result['texts'] == list(TEXTS)
  sim = fi @ ft.T                                            # (images, texts)
  np.testing.assert_allclose(result['similarity'], sim, atol=1e-6)
  assert result['text_to_image'] == np.argsort(-sim.T, axis=1)[:, :k].tolist()
  assert result['image_to_text'] == np.argsort(-sim, axis=1)[:, :k].tolist()
  np.testing.assert_allclose(result['text_to_image_scores'],
                             np.sort(sim.T, axis=1)[:, ::-1][:, :k], atol=1e-6)


# ----------------------------------------------------------------------------- tasks


def test_caption(tmp_path, spm, image_dir, capsys):
  path, cfg, params = params_dir(tmp_path, 'captioning', seed=5)
  out = str(tmp_path / 'cap.json')
  assert predict.main(['caption', path, image_dir, '--spm', spm, '--beam-size', '2',
                       '--max-len', '6', '--length-penalty', '0.6', '--output', out]) == 0
  printed = capsys.readouterr().out
  assert 'beam search of 2' in printed
  result = json.loads(open(out).read())
  tok = text_lib.TextTokenizer.from_file(spm)
  tokens = np.asarray(generate_captions(params, cfg, inputs(image_dir), tok.bos_id, tok.eos_id,
                                        tok.pad_id, tok.mask_id, 6, 2, 0.6))
  assert np.array_equal(np.asarray(result['tokens']), tokens)
  assert result['captions'] == [tok.decode(row) for row in tokens]
  for p, c in zip(image_files(image_dir), result['captions']):
    assert f'{p}: {c}' in printed


def test_answer_from_a_training_workdir(tmp_path, spm, image_dir, capsys):
  cfg, params = task_params('vqa', {'num_answers': len(ANSWERS)}, seed=7)
  mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
  workdir = training_workdir(tmp_path, 'vqa', params, cfg, answers=ANSWERS, **{
      'data.spm_path': spm, 'data.text_len': 10, 'data.image_mean': mean,
      'data.image_std': std})
  questions = ['what colour is it?', 'is it red?', 'how many?']
  out = str(tmp_path / 'ans.npz')
  # The run config gives the answers, the .spm, the text length and the image mean/std.
  assert predict.main(['answer', workdir, '--image', image_files(image_dir)[0], '--question',
                       questions[0], '--question', questions[1], '--top-k', '2',
                       '--output', out]) == 0
  printed = capsys.readouterr().out
  assert 'run config' in printed and 'vqa, num_answers=5' in printed
  saved = np.load(out)
  ids, pad = texts_in(spm, questions[:2], 10)
  images = np.repeat(inputs(image_dir, mean=mean, std=std)[:1], 2, axis=0)
  direct = np.asarray(jitted(heads.VQAModel(cfg, len(ANSWERS)))(params, images, ids, pad))
  np.testing.assert_allclose(saved['logits'], direct, atol=1e-5)
  want = [ANSWERS[i] for i in np.argmax(direct, axis=-1)]
  assert saved['answers'].tolist() == want
  assert saved['top_k_answers'].shape == (2, 2)
  for q, a in zip(questions[:2], want):
    assert f"{q!r} -> {a} (" in printed

  # --answers overrides the run config's; unilm's answer2label.txt (JSON lines) is read.
  labels = tmp_path / 'answer2label.txt'
  labels.write_text(''.join(json.dumps({'answer': a.upper(), 'label': i})
                            for i, a in reversed(list(enumerate(ANSWERS)))).replace('}{', '}\n{'))
  assert vqa.read_answers(str(labels), predict.read_lines) == [a.upper() for a in ANSWERS]
  assert predict.main(['answer', workdir, '--image', image_files(image_dir)[0], '--question',
                       questions[0], '--question', questions[1], '--answers', str(labels),
                       '--output', out]) == 0
  assert np.load(out)['answers'].tolist() == [a.upper() for a in want]


def test_classify_from_a_params_dir_and_a_workdir(tmp_path, image_dir, capsys):
  sizes = {'num_classes': len(CLASSES)}
  path, cfg, params = params_dir(tmp_path, 'classification', sizes, seed=9)
  model = jitted(heads.ImageClassifier(cfg, len(CLASSES)))
  # A converted classification model: ImageNet mean/std (unilm's in1k recipe) and unilm's
  # ImageNet view (the shorter side resized, then the centre crop), index names.
  out = str(tmp_path / 'cls.json')
  assert predict.main(['classify', path, *image_files(image_dir), '--top-k', '3',
                       '--output', out]) == 0
  assert 'ImageNet' in capsys.readouterr().out
  result = json.loads(open(out).read())
  direct = np.asarray(model(params, inputs(image_dir, mean=image_ops.IMAGENET_MEAN,
                                           std=image_ops.IMAGENET_STD, crop_pct=1.0)))
  np.testing.assert_allclose(result['logits'], direct, atol=1e-5)
  assert [r[0] for r in result['top_k']] == np.argmax(direct, axis=-1).tolist()
  assert result['top_k_classes'][0][0] == str(int(np.argmax(direct[0])))
  np.testing.assert_allclose(np.sum(result['top_k_probs'], -1) <= 1 + 1e-6, True)

  # Our workdir: class names from its run config (BEiT-3 mean/std by default).
  workdir = training_workdir(tmp_path, 'classification', params, cfg, num_classes=len(CLASSES),
                             class_names=CLASSES)
  assert predict.main(['classify', workdir, image_dir, '--top-k', '1', '--output', out]) == 0
  printed = capsys.readouterr().out
  result = json.loads(open(out).read())
  direct = np.asarray(model(params, inputs(image_dir)))
  assert result['top_k_classes'] == [[CLASSES[i]] for i in np.argmax(direct, axis=-1)]
  assert f'{image_files(image_dir)[0]}: {CLASSES[np.argmax(direct[0])]} ' in printed


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_refused_with_what_to_do(retrieval_dir, tmp_path, spm, image_dir, capsys):
  path, _, _ = retrieval_dir
  with pytest.raises(SystemExit, match='--spm'):                    # no .spm at all
    predict.main(['embed', path, '--text', 'a cat'])
  with pytest.raises(SystemExit, match='no such file'):
    predict.main(['embed', path, '--text', 'a cat', '--spm', str(tmp_path / 'absent.spm')])
  with pytest.raises(SystemExit, match='answer needs a vqa model.*retrieval model.*'
                     'use: embed, retrieve'):
    predict.main(['answer', path, '--image', image_dir, '--question', 'q?', '--spm', spm])
  with pytest.raises(SystemExit, match='caption needs a captioning model'):
    predict.main(['caption', path, image_dir, '--spm', spm])
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.md').write_text('no pictures here')
  with pytest.raises(SystemExit, match='has no images'):
    predict.main(['retrieve', path, '--images', str(empty), '--texts', __file__, '--spm', spm])
  with pytest.raises(SystemExit, match='neither a training checkpoint .* nor a params directory'):
    predict.main(['embed', str(empty), '--image', image_dir])
  with pytest.raises(SystemExit, match='embed needs --image'):
    predict.main(['embed', path])
  # A converted VQA model needs its answer vocabulary.
  vqa, _, _ = params_dir(tmp_path, 'vqa', {'num_answers': 2})
  with pytest.raises(SystemExit, match='--answers FILE'):
    predict.main(['answer', vqa, '--image', image_dir, '--question', 'q?', '--spm', spm])
  labels = tmp_path / 'answers.txt'
  labels.write_text('yes\nno\nmaybe\n')
  with pytest.raises(SystemExit, match='3 answers from .*answers.txt, but the head has 2'):
    predict.main(['answer', vqa, '--image', image_dir, '--question', 'q?', '--spm', spm,
                  '--answers', str(labels)])


# ----------------------------------------------------------------------------- convert --task


def unilm_pth(tmp_path, task, head_sizes=None, seed=0):
  cfg, params = task_params(task, head_sizes, seed)
  sd = convert.model_to_torch(params, cfg, layout='unilm')
  src = str(tmp_path / f'{task}.pth')
  torch_files.save_state_dict(sd, src, wrap_model=True)
  return src, cfg, params, sd


def tiny_sets(cfg):
  base = get_config('base').to_dict()
  return [a for k, v in cfg.to_dict().items() if k != 'normalize_output' and base[k] != v
          for a in ('--set', f'{k}={v}')]


@pytest.mark.parametrize('task,sizes', [('vqa', {'num_answers': 7}), ('retrieval', {})])
def test_convert_task_round_trip(tmp_path, task, sizes, capsys):
  src, cfg, params, sd = unilm_pth(tmp_path, task, sizes)
  out = str(tmp_path / 'flax')
  assert convert.main(['to-flax', src, out, '--variant', 'base', *tiny_sets(cfg),
                       '--task', task]) == 0
  printed = capsys.readouterr().out
  # unilm's VQA model has no final encoder norm: normalize_output=False is read off the keys.
  assert ('normalize_output=False' in printed) == (task == 'vqa')
  (got_task, got_sizes), got_cfg = params_io.read_task(out), params_io.load_model_config(out)
  got = params_io.load_params(out, got_cfg)
  assert (got_task, got_sizes) == (task, sizes)
  assert got_cfg.to_dict() == cfg.to_dict()
  flat_a, flat_b = param_tree.flatten(got), param_tree.flatten(params)
  assert set(flat_a) == set(flat_b)
  for k in flat_b:
    assert flat_a[k].dtype == np.float32 and np.array_equal(flat_a[k], flat_b[k]), k
  assert json.loads(open(os.path.join(out, 'config.json')).read())['task'] == task
  # load_params (e.g. training's init_from) gives the task model's whole tree.
  assert set(params_io.load_params(out)) == set(params)

  back = str(tmp_path / 'back.pth')
  assert convert.main(['to-torch', out, back]) == 0          # unilm layout by default
  raw = torch.load(back, map_location='cpu', weights_only=True)
  assert set(raw) == {'model'}
  assert set(raw['model']) == set(sd)
  head_keys = {k for k in sd if not k.startswith('beit3.')}
  assert head_keys == set(convert.heads_to_torch(
      {k: v for k, v in params.items() if k != 'beit3'}))
  for k, v in sd.items():
    assert np.array_equal(raw['model'][k].numpy(), v), k
  with pytest.raises(ValueError, match='layout unilm'):
    convert.main(['to-torch', out, str(tmp_path / 'ts.pth'), '--layout', 'torchscale'])


def test_convert_task_mismatch_is_named(tmp_path, capsys):
  src, cfg, _, _ = unilm_pth(tmp_path, 'retrieval')
  out = str(tmp_path / 'flax')
  with pytest.raises(convert.ConversionError, match='looks like a retrieval checkpoint.*'
                     '--task retrieval'):
    convert.main(['to-flax', src, out, '--variant', 'base', *tiny_sets(cfg), '--task', 'vqa'])
  with pytest.raises(convert.ConversionError, match='(?s)vision_head.*--task retrieval'):
    convert.main(['to-flax', src, out, '--variant', 'base', *tiny_sets(cfg)])
