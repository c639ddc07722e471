"""The NLVR2, retrieval and captioning objectives train; captioning masking follows unilm;
mixup/cutmix targets; the whole-split evaluators equal a direct computation; `mode=eval`
re-evaluates a checkpoint into the same metrics file."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.core import meta

import train_fixtures as fx
from beit3_jax import sharding
from beit3_jax.data import finetuning as ft_data
from beit3_jax.data import image_ops, pipeline, schema, synthetic_world
from beit3_jax.data import text as text_lib
from beit3_jax import tasks
from beit3_jax.defaults import loop_fields
from beit3_jax.tasks import captioning, classification, metrics, nlvr2, retrieval
from beit3_jax.tasks.captioning import generate_captions
from beit3_jax.trainer import loop

pytestmark = pytest.mark.usefixtures('fast_compile')

B = 8
L = fx.TEXT_LEN


def _cfg():
  return fx.model_config(normalize_output=False)


def _text(rng):
  lengths = rng.integers(4, L + 1, size=B)
  ids = rng.integers(4, 90, (B, L)).astype(np.int32)
  pad = np.arange(L)[None, :] >= lengths[:, None]
  ids[:, 0] = 0
  ids[np.arange(B), lengths - 1] = 2
  ids[pad] = 1
  return ids, pad


def _batch(task, seed=0):
  rng = np.random.default_rng(seed)
  s = _cfg().img_size
  image = lambda: rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8)  # noqa: E731
  ids, pad = _text(rng)
  if task == 'nlvr2':
    out = {'image_a': image(), 'image_b': image(), 'text_ids': ids, 'text_padding_mask': pad,
           'label': rng.integers(0, 2, B).astype(np.int32)}
  elif task == 'retrieval':
    out = {'image': image(), 'text_ids': ids, 'text_padding_mask': pad}
  else:
    masked = [captioning.mask_caption(i, p, rng, 0.6, fx.MASK_ID, 3, fx.VOCAB)
              for i, p in zip(ids, pad)]
    out = {'image': image(), 'text_ids': np.stack([m[0] for m in masked]),
           'text_padding_mask': pad, 'text_targets': ids,
           'text_mask': np.stack([m[1] for m in masked])}
  schema.check(tasks.get(task).batch_fields, out)
  return {task: out}


OBJECTIVES = {
    'nlvr2': lambda: nlvr2.NLVR2Finetune(_cfg(), text_len=L),
    'retrieval': lambda: retrieval.RetrievalFinetune(_cfg(), text_len=L),
    'captioning': lambda: captioning.CaptioningFinetune(_cfg(), 0.1, text_len=L),
}


@pytest.mark.parametrize('task', sorted(OBJECTIVES))
def test_objective_trains(task):
  objective = OBJECTIVES[task]()
  losses, train, val = fx.train_objective(objective, _batch(task), steps=5, lr=1e-3)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  assert {f'{task}/loss', f'{task}/baseline_accuracy', f'{task}/examples'} <= set(train)
  assert set(val) == set(train)
  if task == 'retrieval':
    assert losses[0] == pytest.approx(np.log(B), rel=0.5)        # ~chance at init
    assert val['retrieval/baseline_accuracy'] == 1 / B
  if task == 'captioning':   # examples = masked tokens
    assert val['captioning/examples'] == _batch(task)[task]['text_mask'].sum()
  if task == 'nlvr2':
    labels = _batch(task)['nlvr2']['label']
    assert val['nlvr2/baseline_accuracy'] == np.max(np.bincount(labels, minlength=2)) / B


@pytest.mark.parametrize('task', ['classification', 'vqa', 'nlvr2'])
def test_validation_sums_count_only_the_valid_rows(task):
  """A validation batch's padding rows (valid=False, `pipeline.Stream(pad_final_batch=True)`)
  add nothing: the sums equal those of the valid rows alone."""
  from beit3_jax.tasks import vqa
  from beit3_jax.trainer import step as step_lib
  rng = np.random.default_rng(3)
  if task == 'nlvr2':
    objective, batch = nlvr2.NLVR2Finetune(_cfg(), text_len=L), _batch('nlvr2')
  else:
    s = _cfg().img_size
    image = rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8)
    if task == 'classification':
      objective = classification.ClassificationFinetune(_cfg(), 4, 0.1)
      batch = {task: {'image': image, 'label': rng.integers(0, 4, B).astype(np.int32)}}
    else:
      ids, pad = _text(rng)
      objective = vqa.VQAFinetune(_cfg(), 5, text_len=L)
      batch = {task: {'image': image, 'text_ids': ids, 'text_padding_mask': pad,
                      'answer_scores': rng.uniform(0, 1, (B, 5)).astype(np.float32)}}
  params = meta.unbox(objective.init_params(jax.random.key(0)))
  eval_step = jax.jit(step_lib.make_eval_step(objective))
  keep = np.array([1, 1, 0, 1, 1, 0, 1, 0], bool)
  masked = {task: {**batch[task], 'valid': keep}}
  kept = {task: {k: v[keep] for k, v in batch[task].items()}}
  got = jax.device_get(eval_step(params, {}, {}, masked))[task]
  want = jax.device_get(eval_step(params, {}, {}, kept))[task]
  assert float(got['count']) == keep.sum()
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key], np.float64),
                               np.asarray(want[key], np.float64), rtol=1e-5, atol=1e-5,
                               err_msg=key)


def test_whole_split_validation_scores_every_example_once():
  """eval_batches=0: a 13-example split in batches of 8 is scored whole (13 examples, the
  accuracy of all 13), not 8 (the last partial batch dropped)."""
  import types
  from beit3_jax.trainer import step as step_lib
  objective = classification.ClassificationFinetune(_cfg(), 4)
  rng = np.random.default_rng(1)
  n = 13
  source = [{'image': rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             'label': np.int32(i % 4)} for i in range(n)]
  eval_data = lambda: pipeline.Mixture({'classification': pipeline.Stream(  # noqa: E731
      source, lambda e, rng: e, global_batch=B, seed=1, num_epochs=1, pad_final_batch=True)},
      read_threads=1)
  params = meta.unbox(objective.init_params(jax.random.key(0)))
  state = types.SimpleNamespace(params=params, extra={}, frozen={})
  mesh = sharding.make_mesh((-1, 1, 1))
  eval_step = jax.jit(step_lib.make_eval_step(objective))
  got = loop.evaluate(eval_step, state, eval_data, mesh, 0, objective)
  assert got['classification/examples'] == n
  images = np.stack([e['image'] for e in source])
  logits = objective.apply(params, None, False, images=objective.images(images))
  labels = np.array([e['label'] for e in source])
  assert got['classification/accuracy'] == pytest.approx(
      float(np.mean(np.argmax(logits, -1) == labels)), abs=1e-6)
  assert loop.evaluate(eval_step, state, eval_data, mesh, 1, objective)[
      'classification/examples'] == B


UNILM_CAPTIONING_LOSS = json.loads(
    (pathlib.Path(__file__).resolve().parent / 'fixtures' / 'unilm_captioning_loss.json')
    .read_text())


@pytest.mark.parametrize('case', range(len(UNILM_CAPTIONING_LOSS['cases'])))
def test_captioning_token_losses_and_drop_worst_equal_unilm_s(case):
  """unilm's BertCaptioningLoss (label smoothing s / (V - 1) on the other classes, KL summed;
  after drop_worst_after the worst share dropped), value and gradient, from the fixture."""
  from beit3_jax import losses
  c = UNILM_CAPTIONING_LOSS['cases'][case]
  logits = np.asarray(c['logits'], np.float32)
  target = np.asarray(c['target'], np.int32)
  drop = c['drop_worst_ratio'] > 0 and c['iter'] > c['drop_worst_after']

  def loss(x):
    per, _ = losses.captioning_token_losses(x, target, c['label_smoothing'])
    if drop:
      kept_sum, kept = losses.keep_best(per, np.ones(target.shape, bool), c['drop_worst_ratio'])
      return kept_sum / kept
    return jnp.mean(per)

  value, grad = jax.value_and_grad(loss)(logits)
  np.testing.assert_allclose(float(value), c['loss'], rtol=2e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(c['grad'], np.float32), atol=2e-7)


def test_captioning_objective_drops_the_worst_tokens_after_drop_worst_after():
  """The objective, with its logits replaced by the fixture's: unilm's loss before and after
  the step (`global_step > drop_worst_after`), whatever the masked tokens' place in the rows."""
  c = UNILM_CAPTIONING_LOSS['cases'][1]
  logits = np.asarray(c['logits'], np.float32)
  target = np.asarray(c['target'], np.int32)
  n, vocab = logits.shape
  objective = captioning.CaptioningFinetune(
      _cfg(), c['label_smoothing'], text_len=L, drop_worst_ratio=c['drop_worst_ratio'],
      drop_worst_after=c['drop_worst_after'])
  rows, slots = n // 4, L - 1
  mask = np.zeros((rows, L), bool)
  mask[:, 1:5] = True                           # 4 masked tokens a row, positions 1-4
  targets = np.zeros((rows, L), np.int32)
  targets[mask] = target
  placed = np.zeros((rows, slots, vocab), np.float32)
  placed[:, :4] = logits.reshape(rows, 4, vocab)
  objective.apply = lambda *a, **k: jnp.asarray(placed)  # noqa: E731
  b = {'image': np.zeros((rows, 1, 1, 3), np.uint8), 'text_ids': targets,
       'text_padding_mask': np.zeros((rows, L), bool), 'text_targets': targets,
       'text_mask': mask}
  batch = {'captioning': b}
  norm = objective.normalizers(batch)
  at = lambda step: float(objective.loss(  # noqa: E731
      None, {}, {}, batch, jax.random.key(0), norm, train=True, step=jnp.int32(step))[0])
  whole = UNILM_CAPTIONING_LOSS['cases'][1]
  assert at(c['drop_worst_after'] + 1) == pytest.approx(whole['loss'], rel=2e-6)
  kept_all = float(jnp.mean(captioning.losses.captioning_token_losses(
      logits, target, c['label_smoothing'])[0]))
  assert at(c['drop_worst_after']) == pytest.approx(kept_all, rel=2e-6)
  assert float(objective.loss(None, {}, {}, batch, jax.random.key(0), norm, train=False)[0]) \
      == pytest.approx(kept_all, rel=2e-6)


def test_the_train_step_gives_each_loss_call_the_updates_done_so_far():
  """unilm's global_step: 0 at the first update (captioning's drop-worst counts from it)."""
  seen = []

  class Spy(captioning.CaptioningFinetune):
    def loss(self, *args, step=None, **kwargs):
      if step is not None:
        jax.debug.callback(lambda s: seen.append(int(s)), step)
      return super().loss(*args, step=step, **kwargs)

  fx.train_objective(Spy(_cfg(), 0.1, text_len=L), _batch('captioning'), steps=3)
  assert seen == [0, 1, 2]


def test_mask_caption_follows_unilm():
  rng = np.random.default_rng(0)
  ids = np.array([0, 11, 12, 13, 14, 15, 16, 17, 18, 2, 1, 1], np.int32)
  pad = ids == 1
  n = int((~pad).sum())
  kinds = np.zeros(3)
  for _ in range(400):
    out, mask = captioning.mask_caption(ids, pad, rng, 0.6, 101, 3, 102)
    assert mask.sum() == max(1, min(round(n * 0.6), n - 1))
    assert not mask[0] and not mask[pad].any()               # never <s>, never padding
    assert np.array_equal(out[~mask], ids[~mask])
    kinds += [np.sum(out[mask] == 101), np.sum(out[mask] == ids[mask]),
              np.sum((out[mask] != 101) & (out[mask] != ids[mask]))]
    assert np.all((out[mask] == 101) | (out[mask] == ids[mask])
                  | ((out[mask] >= 3) & (out[mask] < 102)))
  share = kinds / kinds.sum()
  assert share[0] == pytest.approx(0.8, abs=0.03)
  assert share[1] == pytest.approx(0.1 + 0.1 / 99, abs=0.03)   # kept, or drawn as itself
  # A two-token caption (<s> </s>) masks its </s>.
  out, mask = captioning.mask_caption(np.array([0, 2, 1], np.int32), np.array([0, 0, 1], bool),
                                   rng, 0.6, 101, 3, 102)
  assert mask.tolist() == [False, True, False]


def test_mixup_and_cutmix_targets():
  images = jax.random.uniform(jax.random.key(0), (B, 32, 32, 3))
  labels = np.arange(B) % 4
  for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
    objective = classification.ClassificationFinetune(_cfg(), 4, 0.1, mixup=mixup,
                                                       cutmix=cutmix)
    for seed in range(4):
      mixed, targets = objective._mix(images, labels, jax.random.key(seed))
      targets = np.asarray(targets)
      np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
      # Row 0 mixes label 0 (weight lam) with the reversed batch's row 0, label 3.
      lam = ((targets[0, labels[0]] - targets[0, labels[-1]]) / 0.9 + 1) / 2
      if cutmix and not mixup:   # every pixel is its own or the reversed batch's
        own = np.isclose(mixed, images) | np.isclose(mixed, images[::-1])
        assert own.all()
        pasted = np.mean(~np.isclose(np.asarray(mixed)[0], np.asarray(images)[0]))
        assert 1 - lam == pytest.approx(pasted, abs=1e-6)
  off = classification.ClassificationFinetune(_cfg(), 4, 0.1, mixup=0.8, mixup_prob=0.0)
  mixed, targets = off._mix(images, labels, jax.random.key(0))
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(targets, np.eye(4)[labels] * 0.9 + 0.025, rtol=1e-6)


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  rng = np.random.default_rng(0)
  corpus = [synthetic_world.text_corpus_sentence(rng) for _ in range(300)]
  path = str(tmp_path_factory.mktemp('spm') / 'tiny.spm')
  text_lib.save_spm(text_lib.train_spm(corpus, vocab_size=fx.VOCAB - 2), path)
  return path


def _captioned_source(n=6, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    scene = synthetic_world.sample_scene(rng)
    out.append({'image': synthetic_world.render(scene, 32),
                'captions': [c.encode() for c in synthetic_world.captions(scene, rng, 3)]})
  return out


def _mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_retrieval_evaluator_equals_direct_ranking(spm):
  objective = retrieval.RetrievalFinetune(_cfg(), text_len=L)
  params = meta.unbox(objective.init_params(jax.random.key(0)))
  source = _captioned_source()
  tok = text_lib.TextTokenizer.from_file(spm)
  inputs = ft_data.FinetuneInputs(image_size=32, train=False, text_len=L)
  evaluate = retrieval.evaluator(objective, source, 0, 4, inputs, tok)
  assert evaluate.showcase() == []      # nothing evaluated yet
  got = evaluate(params, _mesh())
  images = np.stack([e['image'] for e in source])
  texts = [c.decode() for e in source for c in e['captions']]
  ids, pad = tok.encode_batch(texts, L)
  out = jax.jit(objective.model.apply)({'params': params}, images=image_ops.normalize(images),
                                       text_ids=ids, text_padding_mask=pad)
  sim = np.asarray(out['image_features'], np.float64) @ np.asarray(out['text_features'],
                                                                   np.float64).T
  want = metrics.retrieval_recall(sim, np.repeat(np.arange(6), 3))
  for k, v in want.items():
    assert got[f'retrieval/{k}'] == pytest.approx(v)
  assert got['retrieval/random_r1'] == pytest.approx(1 / 6)
  assert got['retrieval/texts'] == 18
  # The TensorBoard pictures: the first texts as queries, each with its top 5 images.
  shown = evaluate.showcase()
  assert len(shown) == 8
  for t, example in enumerate(shown):
    best = np.argsort(-sim[:, t], kind='stable')[:5]
    assert example.lines[0] == f'query: {texts[t]}'
    assert [s for _, s in example.ranked] == pytest.approx(sim[best, t].tolist(), abs=1e-5)
    np.testing.assert_array_equal(example.ranked[0][0], images[best[0]])
    rank = 1 + int(np.sum(sim[:, t] > sim[t // 3, t]))
    assert example.lines[1] == f'true image: #{t // 3} (rank {rank})'


def test_captioning_evaluator_scores_the_generated_captions(spm):
  config = ml_collections.ConfigDict({'model': _cfg(), 'captioning': {
      'beam_size': 2, 'length_penalty': 0.6, 'max_len': 6}})
  model = captioning.TASK.model(config.model)
  params = meta.unbox(model.init(jax.random.key(1), **captioning.TASK.example_inputs(
      config.model))['params'])
  source = _captioned_source(5)
  tok = text_lib.TextTokenizer.from_file(spm)
  inputs = ft_data.FinetuneInputs(image_size=32, train=False, text_len=L)
  baseline = captioning.most_common_caption(source + [source[0]])
  assert baseline == source[0]['captions'][0].decode()
  evaluate = captioning.evaluator(
      config, source, 0, 4, inputs, tok, baseline, image_mean=image_ops.BEIT3_MEAN,
      image_std=image_ops.BEIT3_STD)
  got = evaluate(params, _mesh())
  images = image_ops.normalize(np.stack([e['image'] for e in source]))
  tokens = generate_captions(params, config.model, images, tok.bos_id, tok.eos_id, tok.pad_id,
                             tok.mask_id, 6, 2, 0.6)
  hyps = [tok.decode(t) for t in np.asarray(tokens)]
  refs = [[c.decode() for c in e['captions']] for e in source]
  # Scored on coco-caption's PTB tokens, as unilm's coco_caption_eval scores them.
  tokenized = metrics.ptb_tokenize(hyps + [r for group in refs for r in group], 'python')
  hyps_t = tokenized[:5]
  refs_t = [tokenized[5 + 3 * i:8 + 3 * i] for i in range(5)]
  assert got['captioning/cider'] == pytest.approx(metrics.cider_d(hyps_t, refs_t))
  assert got['captioning/bleu4'] == pytest.approx(metrics.bleu4(hyps_t, refs_t))
  assert got['captioning/baseline_cider'] == pytest.approx(
      metrics.coco_caption_scores([baseline] * 5, refs, 'python')['cider_d'])
  assert got['captioning/images'] == 5
  # The TensorBoard pictures: each image with its references and the generated caption.
  shown = evaluate.showcase()
  assert len(shown) == 5
  for i, example in enumerate(shown):
    np.testing.assert_array_equal(example.images[0], source[i]['image'])
    assert example.lines == tuple([f'truth: {r}' for r in refs[i]] + [f'prediction: {hyps[i]}'])


def test_eval_mode_reevaluates_a_checkpoint(tmp_path):
  objective = classification.ClassificationFinetune(_cfg(), 4)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (B, 32, 32, 3), dtype=np.uint8),
           'label': (np.arange(B) % 4).astype(np.int32)}
  source = [jax.tree.map(lambda x: x[i], batch) for i in range(B)]
  stream = lambda seed, epochs: pipeline.Mixture({'classification': pipeline.Stream(  # noqa: E731
      source, lambda e, rng: e, global_batch=B, seed=seed, num_epochs=epochs)}, read_threads=1)
  config = ml_collections.ConfigDict()
  loop_fields(config)
  config.update(total_steps=2, checkpoint_every=2, log_every=1, eval_every=2, eval_batches=2,
                mesh_shape=(-1, 1, 1), eval_step=-1)
  tx, schedule = fx.optimizer(total_steps=2, warmup_steps=1)

  def job():
    return loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=stream(0, None),
                    eval_data=lambda: stream(1, 1), frozen={}, frozen_shardings={},
                    flops_per_step=1.0, examples_per_step=B, tokens_per_step=B)
  trained = loop.train(config, tmp_path, job())
  again = loop.evaluate_only(config, tmp_path, job())
  assert again['val'] == pytest.approx(trained['val'])
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  val_rows = [r for r in rows if 'val/classification/accuracy' in r]
  assert [r['step'] for r in val_rows] == [2, 2]
  config.eval_step = 5
  with pytest.raises(ValueError, match='eval_step=5'):
    loop.evaluate_only(config, tmp_path, job())
