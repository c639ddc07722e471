"""Fine-tuning: the classification and VQA objectives train (loss finite and falling, metric
keys present), the per-example transforms give the schema's layouts (VQA: one-hot and VQAv2
soft scores), and init_from a pretraining checkpoint reads only its backbone, resizing its
vision position table to the model's image size."""

import jax
import numpy as np
import pytest

import train_fixtures as fx
from beit3_jax import models
from beit3_jax.data import finetuning as ft_data
from beit3_jax.data import pipeline, schema
from beit3_jax.tasks import classification, vqa

pytestmark = pytest.mark.usefixtures('fast_compile')

B = 8
ANSWERS = 6


def _model_cfg():
  return fx.model_config(normalize_output=False)


def _classification_batch(seed=0):
  rng = np.random.default_rng(seed)
  s = _model_cfg().img_size
  return {'classification': {
      'image': rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8),
      'label': rng.integers(0, 4, (B,)).astype(np.int32)}}


def _vqa_batch(seed=0):
  rng = np.random.default_rng(seed)
  s = _model_cfg().img_size
  ids = rng.integers(4, 40, (B, fx.TEXT_LEN)).astype(np.int32)
  ids[:, 0] = 0
  pad = np.zeros((B, fx.TEXT_LEN), bool)
  pad[:, 7:] = True
  scores = np.zeros((B, ANSWERS), np.float32)
  scores[np.arange(B), rng.integers(0, ANSWERS, B)] = 1.0
  return {'vqa': {'image': rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8),
                  'text_ids': ids, 'text_padding_mask': pad, 'answer_scores': scores}}


def test_classification_objective_trains():
  objective = classification.ClassificationFinetune(_model_cfg(), num_classes=4,
                                                    label_smoothing=0.1)
  losses, train, val = fx.train_objective(objective, _classification_batch())
  assert np.all(np.isfinite(losses))
  assert losses[0] == pytest.approx(np.log(4), abs=0.05)   # the head starts near zero
  assert losses[-1] < losses[0]
  keys = {'loss', 'nll', 'accuracy', 'top5_accuracy', 'baseline_accuracy', 'examples'}
  assert {f'classification/{k}' for k in keys} <= set(train)
  assert set(val) == set(train)
  assert val['classification/examples'] == B
  assert val['classification/top5_accuracy'] == 1.0      # 4 classes: top-5 holds them all
  labels = _classification_batch()['classification']['label']
  assert val['classification/baseline_accuracy'] == np.max(np.bincount(labels)) / B


def test_vqa_objective_trains():
  objective = vqa.VQAFinetune(_model_cfg(), num_answers=ANSWERS, text_len=fx.TEXT_LEN)
  batch = _vqa_batch()
  soft = np.zeros_like(batch['vqa']['answer_scores'])   # soft (VQAv2-like) targets
  soft[:, 1] = 0.6
  soft[0, 2] = 1.0
  batch['vqa']['answer_scores'] = soft
  losses, train, val = fx.train_objective(objective, batch)
  # Always answering answer 1 scores 0.6: the baseline comes from the summed target scores.
  assert val['vqa/baseline_accuracy'] == pytest.approx(0.6)
  assert np.all(np.isfinite(losses))
  assert losses[0] == pytest.approx(ANSWERS * np.log(2), rel=0.2)   # BCE x answers at init
  assert losses[-1] < 0.9 * losses[0]
  assert {f'vqa/{k}' for k in ('loss', 'accuracy', 'baseline_accuracy', 'examples')} <= set(train)
  assert 0.0 <= val['vqa/accuracy'] <= 1.0 and val['vqa/examples'] == B


def test_transforms_give_the_schema_layouts():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
  example = {'image': image, 'label': 2,
             'qa': {'question': [b'what colour is the circle?', b'how many shapes?'],
                    'answer': [b'red', b'two'], 'answer_id': [0, 1]}}
  for train in (True, False):
    cfg = ft_data.FinetuneInputs(image_size=32, train=train, text_len=fx.TEXT_LEN)
    out = classification.transform(cfg, 4)(example, np.random.default_rng(1))
    schema.check(classification.TASK.batch_fields, jax.tree.map(lambda x: np.stack([x, x]), out))
    assert out['image'].shape == (32, 32, 3) and out['label'] == 2

  class Tok:   # a stand-in with the TextTokenizer interface used by the transform
    def encode_sequence(self, text, max_len):
      ids = np.full((max_len,), 1, np.int32)
      n = min(len(text.split()), max_len - 2)
      ids[0], ids[1:n + 1], ids[n + 1] = 0, 5, 2
      return ids, np.arange(max_len) >= n + 2

  cfg = ft_data.FinetuneInputs(image_size=32, train=True, text_len=fx.TEXT_LEN)
  transform = vqa.transform(cfg, Tok(), ('red', 'two', 'yes'))
  out = transform(example, np.random.default_rng(3))
  schema.check(vqa.TASK.batch_fields, jax.tree.map(lambda x: np.stack([x, x]), out))
  assert out['answer_scores'].sum() == 1.0 and out['answer_scores'][:2].sum() == 1.0
  bad = {**example, 'qa': {'question': [b'q?'], 'answer': [b'maybe']}}
  assert isinstance(transform(bad, np.random.default_rng(0)), pipeline.Skip)


class _WordTokenizer:
  """A stand-in with the TextTokenizer interface the transforms use: one id per word."""

  def encode_sequence(self, text, max_len):
    ids = np.full((max_len,), 1, np.int32)
    n = min(len(text.split()), max_len - 2)
    ids[0], ids[1:n + 1], ids[n + 1] = 0, 5, 2
    return ids, np.arange(max_len) >= n + 2


def test_vqa_transform_soft_scores():
  """VQAv2 targets: answer_ids / answer_scores become the soft-score vector; a question without
  any scored answer is skipped in training and kept (all zeros) in evaluation; an id outside
  the vocabulary is an error that names the field."""
  import io
  from PIL import Image
  png = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
      png, format='PNG')
  answers = ('yes', 'no', '2', 'red')
  example = {'image_bytes': png.getvalue(), 'question': b'how many dogs?',
             'multiple_choice_answer': b'2', 'answer_ids': np.array([2, 0], np.int64),
             'answer_scores': np.array([1.0, 0.3], np.float32)}
  fields = ('image_bytes', 'question', 'multiple_choice_answer', 'answer_ids', 'answer_scores')
  for train in (True, False):
    cfg = ft_data.FinetuneInputs(image_size=32, train=train, text_len=fx.TEXT_LEN)
    transform = vqa.transform(cfg, _WordTokenizer(), answers, *fields)
    out = transform(example, np.random.default_rng(1))
    schema.check(vqa.TASK.batch_fields, jax.tree.map(lambda x: np.stack([x, x]), out))
    np.testing.assert_allclose(out['answer_scores'], [0.3, 0.0, 1.0, 0.0])
    unanswered = {**example, 'answer_ids': np.zeros((0,), np.int64),
                  'answer_scores': np.zeros((0,), np.float32)}
    kept = transform(unanswered, np.random.default_rng(1))
    if train:
      assert isinstance(kept, pipeline.Skip)
    else:
      np.testing.assert_array_equal(kept['answer_scores'], np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="'answer_ids' is outside the answer vocabulary of 4"):
      transform({**example, 'answer_ids': np.array([7, 0])}, np.random.default_rng(1))
  with pytest.raises(ValueError, match='need both fields'):
    vqa.transform(cfg, _WordTokenizer(), answers, 'image_bytes', 'question', '', '',
                          'answer_scores')


def test_init_from_a_pretraining_checkpoint_reads_only_the_backbone(tmp_path):
  """A fine-tuning model started from a pretraining run: its `beit3` leaves come from the
  checkpoint (nothing is copied into the workdir), the task heads stay None (fresh init);
  a checkpoint of the same model gives every leaf; a backbone of another shape is refused
  with the leaves named."""
  import flax
  import orbax.checkpoint as ocp
  from beit3_jax.trainer import checkpoints

  objective = vqa.VQAFinetune(_model_cfg(), num_answers=ANSWERS, text_len=fx.TEXT_LEN)
  params = flax.linen.meta.unbox(objective.init_params(jax.random.key(0)))
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  backbone = jax.tree.map(lambda x: np.asarray(x) + 1.0, params['beit3'])
  pretraining = {'beit3': backbone, 'mlm_head': {'kernel': np.ones((4, 3), np.float32)}}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'pre' / 'checkpoints' / '7' / 'state', {'params': pretraining})
    ckpt.save(tmp_path / 'same' / 'checkpoints' / '2' / 'state', {'params': params})

  loaded, what = checkpoints.load_init_params(str(tmp_path / 'pre'), params, shardings)
  assert 'backbone' in what and "['head', 'pooler'] start fresh" in what
  for got, want in zip(jax.tree.leaves(loaded['beit3']), jax.tree.leaves(backbone)):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert all(v is None for v in jax.tree.leaves(loaded['head'], is_leaf=lambda x: x is None))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['pre', 'same']

  loaded, _ = checkpoints.load_init_params(str(tmp_path / 'same'), params, shardings)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  wider = dict(pretraining, beit3=jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,),
                                                                  x.dtype), backbone))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'wide' / 'checkpoints' / '1' / 'state', {'params': wider})
  with pytest.raises(ValueError, match=r'does not fit the model(.|\n)*wrong shape'):
    checkpoints.load_init_params(str(tmp_path / 'wide'), params, shardings)


def test_init_from_resizes_the_vision_position_table(tmp_path):
  """A backbone stored for another image size (a 2G x 2G patch grid) starts a model at G x G:
  the position table is resized bicubically (`positions.resize_table`), every other leaf is
  read as stored; the same for a checkpoint and for a params directory."""
  import flax
  import orbax.checkpoint as ocp
  from beit3_jax import params_io
  from beit3_jax.models import positions
  from beit3_jax.trainer import checkpoints

  cfg = _model_cfg()
  objective = vqa.VQAFinetune(cfg, num_answers=ANSWERS, text_len=fx.TEXT_LEN)
  params = flax.linen.meta.unbox(objective.init_params(jax.random.key(0)))
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
  big_cfg = models.get_config(**{**cfg.to_dict(), 'img_size': 2 * cfg.img_size})
  backbone = flax.linen.meta.unbox(models.init_params(big_cfg, jax.random.key(1)))
  table = np.asarray(backbone['encoder']['embed_positions']['A']['embedding'])
  want_table = positions.resize_table(table, models.num_patches(cfg) + 3)
  assert want_table.shape == params['beit3']['encoder']['embed_positions']['A']['embedding'].shape
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'pre' / 'checkpoints' / '3' / 'state', {'params': {'beit3': backbone}})
  params_io.save_params(tmp_path / 'dir', backbone, big_cfg)
  g = cfg.img_size // cfg.patch_size
  for source in ('pre', 'dir'):
    loaded, what = checkpoints.load_init_params(str(tmp_path / source), params, shardings)
    assert f'resized from {2 * g}x{2 * g} to {g}x{g} patches' in what, what
    got = loaded['beit3']['encoder']['embed_positions']['A']['embedding']
    np.testing.assert_allclose(np.asarray(got), want_table, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(loaded['beit3']['text_embed']['embedding']),
                                  np.asarray(backbone['text_embed']['embedding']))


def test_a_classification_run_validates_the_whole_split_and_draws_its_examples(tmp_path):
  """Through the finetune job: each validation scores all 13 validation examples (batches of
  8: the last one padded and masked) and writes a grid of examples with their top-5 beside
  the truth to TensorBoard as 'val/classification/examples'."""
  from tensorboard.backend.event_processing import event_accumulator
  from PIL import Image
  import io
  import json
  from beit3_jax import defaults, params_io, predict
  from beit3_jax.data import synthetic_world
  from beit3_jax.data.builtin import prepare_builtin
  from beit3_jax.jobs import finetuning
  from beit3_jax.trainer.run_config import save_run_config
  built = prepare_builtin(str(tmp_path / 'data'), image_size=32,
                          num_examples={'train': 16, 'validation': 13, 'test': 0},
                          verbose=False)
  config = defaults.finetune_config('classification')
  config.model = defaults.demo_model(img_size=32, depth=1, normalize_output=False)
  config.data.data_dir = str(tmp_path / 'data')
  config.data.source = built.names['images']
  config.data.builtin_image_size = 32
  config.data.read_threads = 1
  config.num_classes = len(synthetic_world.LABEL_NAMES)
  config.class_names = tuple(synthetic_world.LABEL_NAMES)
  config.update(batch_size=8, total_steps=3, checkpoint_every=1, log_every=1, eval_every=1)
  config.optimizer.warmup_steps = 1
  config.optimizer.lr = 3e-3
  assert config.eval_batches == 0
  save_run_config(config, str(tmp_path / 'run'))    # as main does
  result = finetuning.run(config, str(tmp_path / 'run'))
  assert result['val']['classification/examples'] == 13
  # The best validation's params are kept in <workdir>/best, a checkpoint predict can open.
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  accuracy = {r['step']: r['val/classification/accuracy'] for r in rows
              if 'val/classification/accuracy' in r}
  assert sorted(accuracy) == [1, 2, 3]
  best_step = max(accuracy, key=lambda s: (accuracy[s], -s))   # the first of equals
  record = json.loads((tmp_path / 'run' / 'best' / 'best.json').read_text())
  assert record == {'metric': 'classification/accuracy', 'value': pytest.approx(
      accuracy[best_step]), 'step': best_step}
  assert sorted(p.name for p in (tmp_path / 'run' / 'best').iterdir()) == [
      str(best_step), 'best.json']
  assert result['best'].startswith(str(tmp_path / 'run' / 'best' / str(best_step)))
  kept = predict.load_model(str(tmp_path / 'run' / 'best'))
  assert kept.task == 'classification' and str(best_step) in kept.source
  want = params_io.load_training_params(tmp_path / 'run' / 'checkpoints' / str(best_step))[0]
  jax.tree.map(np.testing.assert_array_equal, kept.params, want)
  acc = event_accumulator.EventAccumulator(str(tmp_path / 'run' / 'tensorboard'),
                                           size_guidance={'images': 0})
  acc.Reload()
  assert 'val/classification/examples' in acc.Tags()['images']
  events = acc.Images('val/classification/examples')
  assert [e.step for e in events] == [1, 2, 3]
  event = events[-1]
  picture = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
  assert picture.shape == (event.height, event.width, 3) and picture.std() > 0
