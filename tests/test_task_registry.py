"""A task registered from this file alone runs through fine-tuning, evaluation and predict.

`ParityTask` (is an image's class index even or odd?) has its own head, objective, batch layout,
whole-split evaluator and predict command; nothing outside this file knows it. It trains on the
built-in images (tiny build), is re-evaluated with mode=eval, and predicts with
`python -m beit3_jax.predict parity WORKDIR IMAGES` (in process).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from beit3_jax import defaults, predict, tasks
from beit3_jax.data import pipeline, schema
from beit3_jax.data.builtin import prepare_builtin
from beit3_jax.data.finetuning import view
from beit3_jax.data.pretraining import get_field, load_image
from beit3_jax.jobs import finetuning
from beit3_jax.models import heads
from beit3_jax.models.layers import Linear
from beit3_jax.tasks import base, evaluation
from beit3_jax.trainer.run_config import save_run_config

NAME = 'parity'
pytestmark = pytest.mark.usefixtures('fast_compile')


class ParityModel(nn.Module):
  """images -> (B, 2) logits from the backbone's CLS output."""
  config: Any

  @nn.compact
  def __call__(self, images, deterministic: bool = True):
    x = heads.backbone(self, self.config)(images=images,
                                          deterministic=deterministic)['encoder_out']
    head = Linear((self.config.embed_dim,), (2,), ('embed', 'mlp'),
                  nn.initializers.normal(0.02), nn.initializers.zeros, name='parity_head')
    return head(x[:, 0].astype(jnp.float32)).astype(jnp.float32)


class ParityObjective(base.Finetune):
  def __init__(self, config):
    super().__init__(TASK, config.model, **base.objective_inputs(config))

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool, step=None):
    del frozen
    b = batch[self.task]
    logits = self.apply(params, rng, train, images=self.images(b['image']))
    labels = b['parity'].astype(jnp.int32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    sums = {'ce': jnp.sum(ce),
            'correct': jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
            'count': jnp.asarray(labels.shape[0], jnp.float32),
            'histogram': base.histogram(labels, 2)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums):
    return base.summarize_sums(sums, {'ce': 'loss', 'correct': 'accuracy'})


def _examples(source, inputs, image_field, label_field):
  images, labels = [], []
  for i in range(len(source)):
    image = load_image(source[i], image_field)
    images.append(view(inputs, image, np.random.default_rng(0)))
    labels.append(int(np.asarray(get_field(source[i], label_field))) % 2)
  return np.stack(images), np.asarray(labels)


def _predict_args(p):
  p.add_argument('images', nargs='+')


def _predict(args, session):
  paths = session.image_paths(args.images)
  out = session.logits([session.images(args, paths)], args.batch_size)
  parity = [('even', 'odd')[int(i)] for i in np.argmax(out, -1)]
  for path, word in zip(paths, parity):
    print(f'{path}: {word}')
  return {'image_files': paths, 'logits': out, 'parity': parity}


class ParityTask(base.Task):
  name = NAME
  needs_text = False
  default_fields = {'image': 'image', 'label': 'label'}
  batch_fields = {'image': schema.IMAGE, 'parity': schema.LABEL}

  def model(self, model_cfg):
    return ParityModel(model_cfg)

  def example_inputs(self, model_cfg, batch_size=1, text_len=8):
    images, _, _ = base.zero_inputs(model_cfg, batch_size, text_len)
    return {'images': images}

  def objective(self, config):
    return ParityObjective(config)

  def transform(self, config, inputs, fields, tokenizer):
    def apply(example, rng):
      image = load_image(example, fields['image'])
      if isinstance(image, pipeline.Skip):
        return image
      return {'image': view(inputs, image, rng),
              'parity': np.int32(int(np.asarray(get_field(example, fields['label']))) % 2)}
    return apply

  def evaluator(self, config, objective, eval_source, train_source, tokenizer, fields):
    images, labels = _examples(eval_source, evaluation.eval_inputs(config), fields['image'],
                               fields['label'])
    fn = jax.jit(lambda p, b: objective.apply(p, None, False,
                                              images=objective.images(b['image'])))

    def evaluate(params, mesh):
      logits = evaluation.batched(lambda b: fn(params, b), {'image': images},
                                  int(config.batch_size), mesh)
      return {f'{NAME}/accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
              f'{NAME}/examples': float(len(labels))}
    return evaluate

  def predict_commands(self):
    return (base.PredictCommand('parity', 'even or odd class', _predict_args, _predict),)


TASK = ParityTask()


@pytest.fixture(scope='module')
def registered():
  tasks.register(TASK)
  yield TASK
  tasks.unregister(NAME)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('parity')
  built = prepare_builtin(str(root / 'data'), image_size=32,
                          num_examples={'train': 32, 'validation': 16, 'test': 0}, verbose=False)
  return root, built


def _config(root, built):
  config = defaults.finetune_config(NAME)
  config.model = defaults.demo_model(img_size=32, depth=2, normalize_output=False)
  config.data.data_dir = str(root / 'data')
  config.data.source = built.names['images']
  config.data.builtin_image_size = 32
  config.data.read_threads = 1
  config.batch_size = 8
  config.total_steps = 4
  config.checkpoint_every = 4
  config.log_every = 2
  config.eval_every = 4
  config.eval_batches = 2
  config.optimizer.warmup_steps = 1
  config.optimizer.layer_decay = 1.0
  return config


def test_a_task_registered_from_a_test_runs_end_to_end(registered, data, tmp_path, capsys):
  root, built = data
  assert NAME in tasks.names()
  config = _config(root, built)
  workdir = str(tmp_path / 'run')
  save_run_config(config, workdir)

  trained = finetuning.run(config, workdir)
  assert set(trained['val']) == {f'{NAME}/accuracy', f'{NAME}/examples'}
  assert trained['val'][f'{NAME}/examples'] == 16
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if f'val/{NAME}/accuracy' in r] == [4]
  assert np.isfinite([r['loss'] for r in rows if 'loss' in r]).all()

  config.mode = 'eval'
  again = finetuning.run(config, workdir)
  assert again['val'] == pytest.approx(trained['val'])

  source = json.loads(open(os.path.join(workdir, 'config.json')).read())
  assert source['task'] == NAME
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  files = []
  for i in range(3):
    path = folder / f'{i}.png'
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    files.append(str(path))
  out = str(tmp_path / 'parity.json')
  capsys.readouterr()
  assert predict.main(['parity', workdir, *files, '--output', out]) == 0
  printed = capsys.readouterr().out
  got = json.loads(open(out).read())
  assert len(got['parity']) == 3 and set(got['parity']) <= {'even', 'odd'}
  for path, word in zip(files, got['parity']):
    assert f'{path}: {word}' in printed
  # predict's logits are the model's on the checkpoint's params.
  model = predict.load_model(workdir)
  images = predict.load_images(files, config.model.img_size, (0.5,) * 3, (0.5,) * 3)
  want = ParityModel(config.model).apply({'params': model.params}, images=images)
  np.testing.assert_allclose(np.asarray(got['logits']), np.asarray(want), rtol=1e-4, atol=1e-5)

  # Commands of other tasks refuse it, and the registry knows nothing of it after the test.
  with pytest.raises(SystemExit, match='parity'):
    predict.main(['classify', workdir, files[0]])


def test_registering_a_taken_name_is_refused(registered):
  with pytest.raises(ValueError, match='registered already'):
    tasks.register(ParityTask())
  with pytest.raises(ValueError, match='known tasks'):
    tasks.get('no_such_task')
