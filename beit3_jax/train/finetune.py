"""The `finetune` job: BEiT-3 fine-tuning on image classification or VQA (configs/finetune/).

Objectives (driven by the generic trainer, see `beit3_jax.train.step`):

  ClassificationFinetune  `ImageClassifier` (mean-pooled patches -> fc_norm -> head); label-
                          smoothed softmax cross-entropy (`config.label_smoothing`).
                          Metrics: classification/{loss, accuracy, top5_accuracy,
                          baseline_accuracy, examples}.
  VQAFinetune             `VQAModel` (pooled vision CLS -> head) over an answer vocabulary
                          (default: the built-in `synthetic_world.ANSWERS`); BCE with logits
                          against the soft answer scores x number of answers (unilm).
                          Metrics: vqa/{loss, accuracy (score of the arg-max answer = VQA
                          accuracy; with one answer per question: arg-max == answer),
                          baseline_accuracy, examples}.

`baseline_accuracy` is the accuracy of always predicting the most frequent target (of the
batch when training, of the evaluated validation batches in evaluation).

Losses are summed over examples and divided by the whole batch's example count, so gradient
accumulation (`micro_batches`) gives the whole batch's gradient.

`init_from` may be a pretraining workdir (params {'beit3', 'mim_head', 'mlm_head'}): only its
`beit3` backbone is taken (exported once to `<workdir>/init_backbone`, a params directory),
and the task head keeps its fresh init. A params directory (the convert CLI's output) or a
fine-tuning checkpoint of the same task is handed to the loop as it is.

Config fields (besides the loop's, `beit3_jax.train.defaults.loop_fields`); see
`finetune_config()`:
  task                   'classification' or 'vqa'.
  model                  the backbone (use normalize_output=False, as unilm's heads).
  num_classes            classification classes; label_smoothing.
  answers                VQA answer vocabulary ('' = the built-in ANSWERS), a tuple of str.
  data.source            'builtin:images' or a TFDS name; data.fields overrides where the
                         image / label / question / answer live in an example.
  data.train_split, eval_split, spm_path, text_len, crop_scale, read_threads.
  batch_size             global batch; optimizer.* (layer_decay as unilm's fine-tuning).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from beit3_jax.data import builtin as builtin_lib
from beit3_jax.data import finetuning as inputs_lib
from beit3_jax.data import image_ops, tfds_sources
from beit3_jax.models import heads, num_patches
from beit3_jax.tasks import losses
from beit3_jax.train import flops as flops_lib
from beit3_jax.train import loop
from beit3_jax.train.defaults import loop_fields
from beit3_jax.train.masked_modeling import reduce_sums
from beit3_jax.train.optimizer import make_optimizer

TASKS = heads.TASKS
INIT_BACKBONE_DIR = 'init_backbone'


def finetune_config(task: str = 'classification') -> ml_collections.ConfigDict:
  """Every field of a fine-tuning config with its default (a config file overrides them).

  Optimizer defaults follow unilm's BEiT-3 fine-tuning (AdamW b2 0.999, weight decay 0.05,
  layer decay 0.65, label smoothing 0.1 for classification and captioning).
  """
  from beit3_jax.models import get_config
  if task not in TASKS:
    raise ValueError(f'task={task!r}; known: {TASKS}.')
  config = ml_collections.ConfigDict()
  config.job = 'finetune'
  loop_fields(config)
  config.mode = 'train'               # 'train', or 'eval': evaluate a checkpoint and stop
  config.eval_step = -1               # mode=eval: the checkpoint step (-1 = the newest)
  config.task = task
  config.model = get_config('base', drop_path_rate=0.1, normalize_output=False)
  # classification
  config.num_classes = 4
  config.class_names = ()             # optional names of the classes (predict prints them)
  config.label_smoothing = 0.1        # classification and captioning
  config.mixup = 0.0                  # mixup alpha (0 = off), unilm ImageNet recipe 0.8
  config.cutmix = 0.0                 # cutmix alpha (0 = off), unilm ImageNet recipe 1.0
  config.mixup_prob = 1.0             # probability of mixing a batch
  config.mixup_switch_prob = 0.5      # probability of cutmix instead of mixup (both on)
  # vqa
  config.answers = ()                 # () = the built-in synthetic_world.ANSWERS
  # captioning (unilm: mask prob 0.6, beam 3, length penalty 0.6, max 32 tokens)
  config.captioning = ml_collections.ConfigDict(dict(
      mask_prob=0.6, beam_size=3, length_penalty=0.6, max_len=32, eval_examples=0))
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''           # '' = $BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax
  config.data.builtin_image_size = 64
  config.data.source = 'builtin:images'
  config.data.fields = ml_collections.ConfigDict()   # e.g. {'label': 'label'}
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.spm_path = ''           # '' = the built-in .spm when the source is built-in
  config.data.text_len = 32
  config.data.crop_scale = (0.5, 1.0)
  config.data.flip_prob = 0.5
  config.data.image_mean = (0.5, 0.5, 0.5)   # unilm's VL tasks; ImageNet: IMAGENET_MEAN/STD
  config.data.image_std = (0.5, 0.5, 0.5)
  config.data.read_threads = 2
  config.batch_size = 256
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-4, min_lr=1e-6, warmup_steps=500, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
      clip_norm=0.0, layer_decay=0.65))
  return config


# ------------------------------------------------------------------------------------------
# Objectives.


def _histogram(targets, num: int):
  return jnp.zeros((num,), jnp.int32).at[targets].add(1)


def _summarize(sums, names: Mapping[str, str]) -> dict[str, float]:
  """Task sums -> '<task>/<metric>' floats; `names` maps a sum to its metric name."""
  metrics = {}
  for task, s in sums.items():
    count = max(float(s['count']), 1.0)
    baseline = (float(np.max(np.asarray(s['histogram']))) if 'histogram' in s
                else float(s['baseline_correct']))
    for key, name in names.items():
      metrics[f'{task}/{name}'] = float(s[key]) / count
    metrics[f'{task}/baseline_accuracy'] = baseline / count
    metrics[f'{task}/examples'] = float(s['count'])
  return metrics


class Finetune:
  """What every fine-tuning objective shares: one task, one stream named after it, params =
  the head model's tree ({'beit3', <head params>}), no extra state, no frozen inputs."""

  task: str = ''

  def __init__(self, model_cfg, model):
    self.model_cfg = model_cfg
    self.model = model

  @property
  def tasks(self) -> tuple[str, ...]:
    return (self.task,)

  def example_inputs(self, batch_size: int = 1) -> dict:
    raise NotImplementedError

  def init_params(self, rng):
    """Boxed params (logical axis names on every leaf)."""
    return self.model.init(rng, **self.example_inputs())['params']

  def init_extra(self, params):
    del params
    return {}

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Examples of the whole batch (the loss denominator)."""
    b = batch[self.task]
    n = jax.tree.leaves(b)[0].shape[0]
    return {self.task: jnp.asarray(float(n), jnp.float32)}

  def logits(self, params, batch, rng, *, train: bool):
    raise NotImplementedError

  def _apply(self, params, rng, train: bool, **inputs):
    rngs = {'drop_path': rng} if train else None
    return self.model.apply({'params': params}, deterministic=not train, rngs=rngs, **inputs)

  def finish(self, params, extra):
    return params, extra

  def reduce(self, sums):
    return reduce_sums(sums)


class ClassificationFinetune(Finetune):
  """Image classification: batch {'classification': {'image' uint8, 'label' int32}}."""

  task = 'classification'

  def __init__(self, model_cfg, num_classes: int, label_smoothing: float = 0.0):
    super().__init__(model_cfg, heads.ImageClassifier(model_cfg, num_classes))
    self.num_classes = int(num_classes)
    self.label_smoothing = float(label_smoothing)

  def example_inputs(self, batch_size: int = 1) -> dict:
    s = self.model_cfg.img_size
    return {'images': jnp.zeros((batch_size, s, s, self.model_cfg.in_chans), jnp.float32)}

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    logits = self._apply(params, rng, train, images=image_ops.normalize(b['image']))
    labels = b['label'].astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    s = self.label_smoothing
    ce = (1.0 - s) * nll + s * (-jnp.mean(logp, axis=-1))   # = losses.cross_entropy per example
    k = min(5, self.num_classes)
    top_k = jax.lax.top_k(logits, k)[1]
    sums = {'ce': jnp.sum(ce), 'nll': jnp.sum(nll),
            'correct': jnp.sum((top_k[:, 0] == labels).astype(jnp.float32)),
            'correct5': jnp.sum(jnp.any(top_k == labels[:, None], axis=-1).astype(jnp.float32)),
            'count': jnp.asarray(labels.shape[0], jnp.float32),
            'histogram': _histogram(labels, self.num_classes)}
    return sums['ce'] / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'ce': 'loss', 'nll': 'nll', 'correct': 'accuracy',
                             'correct5': 'top5_accuracy'})


class VQAFinetune(Finetune):
  """VQA: batch {'vqa': {'image', 'text_ids', 'text_padding_mask', 'answer_scores' (B, A)}}."""

  task = 'vqa'

  def __init__(self, model_cfg, num_answers: int, text_len: int):
    super().__init__(model_cfg, heads.VQAModel(model_cfg, num_answers))
    self.num_answers = int(num_answers)
    self.text_len = int(text_len)

  def example_inputs(self, batch_size: int = 1) -> dict:
    s = self.model_cfg.img_size
    return {'images': jnp.zeros((batch_size, s, s, self.model_cfg.in_chans), jnp.float32),
            'text_ids': jnp.zeros((batch_size, self.text_len), jnp.int32),
            'text_padding_mask': jnp.zeros((batch_size, self.text_len), bool)}

  def loss(self, params, extra, frozen, batch, rng, normalizers, *, train: bool):
    del frozen
    b = batch[self.task]
    logits = self._apply(params, rng, train, images=image_ops.normalize(b['image']),
                         text_ids=b['text_ids'], text_padding_mask=b['text_padding_mask'])
    scores = b['answer_scores'].astype(jnp.float32)
    n = scores.shape[0]
    # Per-example sum over answers = unilm's mean over all entries x A, summed over examples.
    bce = losses.vqa_loss(logits, scores) * n
    predicted = jnp.argmax(logits, axis=-1)
    score = jnp.take_along_axis(scores, predicted[:, None], axis=-1)[:, 0]
    sums = {'bce': bce, 'score': jnp.sum(score),
            'count': jnp.asarray(n, jnp.float32),
            'histogram': _histogram(jnp.argmax(scores, axis=-1), self.num_answers)}
    return bce / normalizers[self.task], ({self.task: sums}, extra)

  def summarize(self, sums) -> dict[str, float]:
    return _summarize(sums, {'bce': 'loss', 'score': 'accuracy'})


def answer_vocabulary(config) -> tuple[str, ...]:
  answers = tuple(config.get('answers') or ())
  if answers:
    return answers
  from beit3_jax.data import synthetic_world
  return tuple(synthetic_world.ANSWERS)


def make_objective(config) -> Finetune:
  task = config.task
  if task == 'classification':
    return ClassificationFinetune(config.model, config.num_classes,
                                  config.get('label_smoothing', 0.0))
  if task == 'vqa':
    return VQAFinetune(config.model, len(answer_vocabulary(config)), config.data.text_len)
  raise ValueError(f'config.task={task!r}; known: {TASKS}.')


# ------------------------------------------------------------------------------------------
# Data.


def resolve_source(data_cfg) -> tuple[str, str, str]:
  """(TFDS dir, TFDS name, spm path or ''), building the built-in data if it is used."""
  tfds_dir, names, spm_path = builtin_lib.resolve_names(
      {'data.source': data_cfg.source}, data_cfg.get('data_dir') or None,
      data_cfg.get('builtin_image_size', 64), data_cfg.get('spm_path') or '')
  return tfds_dir, names['data.source'], spm_path


def make_transform(config, train: bool, text_tokenizer=None):
  d = config.data
  cfg = inputs_lib.FinetuneInputs(image_size=config.model.img_size, train=train,
                                  crop_scale=tuple(d.crop_scale), text_len=d.text_len,
                                  flip_prob=float(d.get('flip_prob', 0.5)))
  fields = dict(d.get('fields') or {})
  if config.task == 'classification':
    return inputs_lib.classification_transform(cfg, config.num_classes,
                                               fields.get('image', 'image'),
                                               fields.get('label', 'label'))
  return inputs_lib.vqa_transform(cfg, text_tokenizer, answer_vocabulary(config),
                                  fields.get('image', 'image'),
                                  fields.get('question', 'qa/question'),
                                  fields.get('answer', 'qa/answer'))


def make_data(config, source, train: bool, seed: int, text_tokenizer=None):
  """Training data (shuffled, repeated, augmented) or one validation epoch (eval transform)."""
  return inputs_lib.make_stream_mixture(
      config.task, source, make_transform(config, train, text_tokenizer),
      int(config.batch_size), seed, num_epochs=None if train else 1,
      read_threads=config.data.get('read_threads', 2))


# ------------------------------------------------------------------------------------------
# init_from a pretraining run.


def prepare_init(config, workdir, objective: Finetune):
  """The config the loop should see: a pretraining checkpoint's backbone exported as a params
  directory under the workdir (once), so that the task head keeps its fresh init."""
  init = config.get('init_from') or ''
  if not init:
    return config, None
  from beit3_jax import params_io
  from beit3_jax.convert import flatten_params, unflatten_params
  from beit3_jax.models import abstract_params
  workdir = epath.Path(workdir)
  if params_io.find_step_dir(workdir) is not None:
    return config, None          # the loop resumes; init_from is not used
  if params_io.find_step_dir(init) is None:
    return config, None          # a params directory: the loop places it under `beit3`
  tree, step_dir = params_io.load_training_params(init)
  model_keys = set(jax.eval_shape(objective.init_params, jax.random.key(0)))
  if set(tree) == model_keys:
    return config, None          # a checkpoint of the same model: the loop restores it all
  if 'beit3' not in tree:
    raise ValueError(f'init_from={init!r}: its params have {sorted(tree)}, no `beit3`.')
  want = flatten_params(abstract_params(config.model, boxed=False))
  have = flatten_params(tree['beit3'])
  missing = sorted(k for k in want if k not in have)
  misshaped = sorted(k for k in want if k in have and tuple(np.shape(have[k]))
                     != tuple(want[k].shape))
  if missing or misshaped:
    raise ValueError(f'init_from={init!r}: its backbone does not fit config.model: missing '
                     f'{missing[:8]}, mis-shaped {misshaped[:8]}.')
  target = workdir / INIT_BACKBONE_DIR
  if jax.process_index() == 0:
    params_io.save_params(target, unflatten_params({k: np.asarray(have[k]) for k in want}),
                          config.model, overwrite=True)
  new = config.copy_and_resolve_references()
  new.init_from = str(target)
  return new, f'backbone of {step_dir} (exported to {target})'


# ------------------------------------------------------------------------------------------
# The job.


def build_job(config, workdir) -> tuple[loop.Job, Any]:
  """(the loop's job, the config the loop runs with)."""
  from beit3_jax.data.text import TextTokenizer
  objective = make_objective(config)
  tfds_dir, name, spm_path = resolve_source(config.data)
  text_tokenizer = None
  if config.task == 'vqa':
    if not spm_path:
      raise ValueError('data.spm_path is empty: give the SentencePiece model of the questions.')
    text_tokenizer = TextTokenizer.from_file(spm_path)
    if config.model.vocab_size < text_tokenizer.vocab_size:
      raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                       f'{text_tokenizer.vocab_size} ids of {spm_path}.')
  d = config.data
  train_source = tfds_sources.open_source(name, d.train_split, tfds_dir)
  train_data = make_data(config, train_source, True, config.seed, text_tokenizer)
  eval_data = None
  if config.get('eval_every', 0):
    eval_source = tfds_sources.open_source(name, d.eval_split, tfds_dir)
    eval_data = lambda: make_data(config, eval_source, False, config.seed + 1,  # noqa: E731
                                  text_tokenizer)
  run_config, init_line = prepare_init(config, workdir, objective)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, config.model.depth)

  b = int(config.batch_size)
  text_len = d.text_len if config.task == 'vqa' else 0
  forward = flops_lib.beit3_forward_flops(config.model, images=True, text_len=text_len)
  tokens = b * (1 + num_patches(config.model) + text_len)
  m = config.model
  describe = [
      f'Model: {m.variant} D={m.embed_dim} depth={m.depth} heads={m.num_heads} '
      f'{m.img_size}px/{m.patch_size} vocab {m.vocab_size}; dtype {m.dtype}; '
      f'normalize_output={m.normalize_output}',
      f'Task: {config.task} ({type(objective).__name__}); data {name} '
      f'{d.train_split} / {d.eval_split} x{b} (TFDS dir {tfds_dir})'
      + (f'; {len(answer_vocabulary(config))} answers, text {spm_path}'
         if config.task == 'vqa' else f'; {config.num_classes} classes'),
  ]
  if init_line:
    describe.append(f'init_from: {init_line}')
  job = loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=train_data,
                 eval_data=eval_data, frozen={}, frozen_shardings={},
                 flops_per_step=3.0 * forward * b, examples_per_step=b, tokens_per_step=tokens,
                 describe=describe)
  return job, run_config


def run(config, workdir) -> dict:
  job, run_config = build_job(config, workdir)
  return loop.train(run_config, workdir, job)
