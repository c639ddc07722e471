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

`init_from` may be a pretraining workdir (params {'beit3', 'mim_head', 'mlm_head'}) or another
task's: only its `beit3` backbone is read and the task head keeps its fresh init
(`checkpoints.load_init_params`). A fine-tuning checkpoint of the same task gives every
param; a params directory (the convert CLI's output) gives what it holds.

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

import ml_collections

from beit3_jax.data import builtin as builtin_lib
from beit3_jax.data import finetuning as inputs_lib
from beit3_jax.data import tfds_sources
from beit3_jax.models import heads, num_patches
from beit3_jax.train import flops as flops_lib
from beit3_jax.train import loop, task_evaluation, task_objectives
from beit3_jax.train.defaults import loop_fields
from beit3_jax.train.optimizer import make_optimizer

TASKS = heads.TASKS


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
      clip_norm=0.0, layer_decay=0.65, task_head_lr_weight=1.0))
  return config


def demo_config(task: str) -> ml_collections.ConfigDict:
  """What the `configs/finetune/<task>_demo.py` configs share: the demo pretraining's model
  (configs/pretrain/demo.py; without the final norm for classification and VQA, as unilm's
  models) started from its
  run in workdirs/demo, batches of 32 of the built-in data (64 px, 24 text tokens), AdamW
  with warmup + cosine. Each demo config sets its steps, learning rate and task fields."""
  from beit3_jax.models import get_config
  config = finetune_config(task)
  config.init_from = 'workdirs/demo'
  # unilm drops the final norm for classification and VQA only.
  config.model = get_config('small', embed_dim=128, depth=4, num_heads=4, mlp_dim=512,
                            img_size=64, patch_size=8, vocab_size=128, max_text_positions=34,
                            drop_path_rate=0.0, position_init_std=0.02,
                            normalize_output=task not in ('classification', 'vqa'))
  config.data.source = BUILTIN_SOURCES[task]
  config.data.text_len = 24
  config.data.crop_scale = (0.8, 1.0)
  config.data.read_threads = 2
  config.batch_size = 32
  config.total_steps = 300
  config.checkpoint_every = 300
  config.log_every = 25
  config.eval_every = 150
  config.eval_batches = 7             # 224 validation examples
  config.optimizer.lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.warmup_steps = 20
  config.optimizer.layer_decay = 1.0
  config.label_smoothing = 0.1
  config.captioning.max_len = 20
  return config


def answer_vocabulary(config) -> tuple[str, ...]:
  answers = tuple(config.get('answers') or ())
  if answers:
    return answers
  from beit3_jax.data import synthetic_world
  return tuple(synthetic_world.ANSWERS)


def make_objective(config) -> task_objectives.Finetune:
  num_answers = len(answer_vocabulary(config)) if config.task == 'vqa' else 0
  return task_objectives.make_objective(config, num_answers)


# ------------------------------------------------------------------------------------------
# Data.

# Where each task's fields live in an example, by default (the built-in data's names; the
# manual-dir builders of beit3_jax.data.builders use the same). data.fields overrides them.
DEFAULT_FIELDS = {
    'classification': {'image': 'image', 'label': 'label'},
    'vqa': {'image': 'image', 'question': 'qa/question', 'answer': 'qa/answer',
            'answer_ids': '', 'answer_scores': ''},   # '': one-hot on `answer`
    'nlvr2': {'image_a': 'image_a', 'image_b': 'image_b', 'statement': 'statement',
              'label': 'label'},
    'retrieval': {'image': 'image', 'captions': 'captions'},
    'captioning': {'image': 'image', 'captions': 'captions'},
}
BUILTIN_SOURCES = {'classification': 'builtin:images', 'vqa': 'builtin:images',
                   'nlvr2': 'builtin:nlvr2', 'retrieval': 'builtin:images',
                   'captioning': 'builtin:images'}


def resolve_source(data_cfg) -> tuple[str, str, str]:
  """(TFDS dir, TFDS name, spm path or ''), building the built-in data if it is used."""
  tfds_dir, names, spm_path = builtin_lib.resolve_names(
      {'data.source': data_cfg.source}, data_cfg.get('data_dir') or None,
      data_cfg.get('builtin_image_size', 64), data_cfg.get('spm_path') or '')
  return tfds_dir, names['data.source'], spm_path


def fields(config) -> dict[str, str]:
  return inputs_lib.field_overrides(config.data.get('fields'), DEFAULT_FIELDS[config.task])


def input_settings(config, train: bool) -> inputs_lib.FinetuneInputs:
  d = config.data
  return inputs_lib.FinetuneInputs(image_size=config.model.img_size, train=train,
                                   crop_scale=tuple(d.crop_scale), text_len=d.text_len,
                                   flip_prob=float(d.get('flip_prob', 0.5)))


def make_transform(config, train: bool, text_tokenizer=None):
  cfg = input_settings(config, train)
  f = fields(config)
  task = config.task
  if task == 'classification':
    return inputs_lib.classification_transform(cfg, config.num_classes, f['image'], f['label'])
  if task == 'vqa':
    return inputs_lib.vqa_transform(cfg, text_tokenizer, answer_vocabulary(config), f['image'],
                                    f['question'], f['answer'], f['answer_ids'],
                                    f['answer_scores'])
  if task == 'nlvr2':
    return inputs_lib.nlvr2_transform(cfg, text_tokenizer, f['image_a'], f['image_b'],
                                      f['statement'], f['label'])
  if task == 'retrieval':
    return inputs_lib.retrieval_transform(cfg, text_tokenizer, f['image'], f['captions'])
  return inputs_lib.captioning_transform(cfg, text_tokenizer,
                                         float(config.captioning.mask_prob), f['image'],
                                         f['captions'])


def make_data(config, source, train: bool, seed: int, text_tokenizer=None):
  """Training data (shuffled, repeated, augmented) or one validation epoch (eval transform)."""
  return inputs_lib.make_stream_mixture(
      config.task, source, make_transform(config, train, text_tokenizer),
      int(config.batch_size), seed, num_epochs=None if train else 1,
      read_threads=config.data.get('read_threads', 2))


def make_evaluator(config, objective, eval_source, train_source, text_tokenizer):
  """The whole-split evaluator of retrieval / captioning (None for the other tasks)."""
  if config.task not in ('retrieval', 'captioning'):
    return None
  f = fields(config)
  count = int(config.eval_batches) * int(config.batch_size)
  inputs = input_settings(config, train=False)
  if config.task == 'retrieval':
    return task_evaluation.retrieval_evaluator(objective, eval_source, count,
                                               int(config.batch_size), inputs, text_tokenizer,
                                               f['image'], f['captions'])
  baseline = task_evaluation.most_common_caption(train_source, f['captions'])
  n = int(config.captioning.get('eval_examples', 0)) or count
  return task_evaluation.captioning_evaluator(
      config, eval_source, n, int(config.batch_size), inputs, text_tokenizer, baseline,
      image_mean=objective.image_mean, image_std=objective.image_std, image_field=f['image'],
      caption_field=f['captions'])


# ------------------------------------------------------------------------------------------
# The job.


def task_flops(config) -> tuple[float, int]:
  """(analytic forward FLOPs, backbone tokens) of one example of config.task."""
  m, text_len = config.model, int(config.data.text_len)
  tokens_image = 1 + num_patches(m)
  f = flops_lib.beit3_forward_flops
  if config.task == 'classification':
    return f(m, images=True), tokens_image
  if config.task == 'nlvr2':
    return 2 * f(m, images=True, text_len=text_len), 2 * (tokens_image + text_len)
  if config.task == 'retrieval':
    return (f(m, images=True) + f(m, images=False, text_len=text_len),
            tokens_image + text_len)
  return f(m, images=True, text_len=text_len), tokens_image + text_len


def _text_tokenizer(config, spm_path: str):
  from beit3_jax.data.text import TextTokenizer
  if config.task == 'classification':
    return None
  if not spm_path:
    raise ValueError(f'data.spm_path is empty: task {config.task!r} needs the SentencePiece '
                     'model of its texts (beit3.spm for converted unilm weights).')
  tokenizer = TextTokenizer.from_file(spm_path)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'{tokenizer.vocab_size} ids of {spm_path}.')
  return tokenizer


def build_job(config) -> loop.Job:
  """The loop's job for a fine-tuning config."""
  if config.task not in TASKS:
    raise ValueError(f'config.task={config.task!r}; known: {TASKS}.')
  if config.get('mode', 'train') not in ('train', 'eval'):
    raise ValueError(f"config.mode={config.mode!r}; expected 'train' or 'eval'.")
  objective = make_objective(config)
  tfds_dir, name, spm_path = resolve_source(config.data)
  text_tokenizer = _text_tokenizer(config, spm_path)
  d = config.data
  train_source = tfds_sources.open_source(name, d.train_split, tfds_dir)
  train_data = make_data(config, train_source, True, config.seed, text_tokenizer)
  eval_data, evaluator = None, None
  if config.get('eval_every', 0) or config.get('mode', 'train') == 'eval':
    eval_source = tfds_sources.open_source(name, d.eval_split, tfds_dir)
    evaluator = make_evaluator(config, objective, eval_source, train_source, text_tokenizer)
    if evaluator is None:
      eval_data = lambda: make_data(config, eval_source, False,  # noqa: E731
                                    config.seed + 1, text_tokenizer)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, config.model.depth)

  b = int(config.batch_size)
  forward, tokens = task_flops(config)
  m = config.model
  what = {'classification': f'{config.num_classes} classes',
          'vqa': f'{len(answer_vocabulary(config))} answers'}.get(config.task, '')
  describe = [
      f'Model: {m.variant} D={m.embed_dim} depth={m.depth} heads={m.num_heads} '
      f'{m.img_size}px/{m.patch_size} vocab {m.vocab_size}; dtype {m.dtype}; '
      f'normalize_output={m.normalize_output}',
      f'Task: {config.task} ({type(objective).__name__}); data {name} '
      f'{d.train_split} / {d.eval_split} x{b} (TFDS dir {tfds_dir})'
      + (f'; {what}' if what else '') + (f'; text {spm_path}' if text_tokenizer else ''),
  ]
  job = loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=train_data,
                 eval_data=eval_data, frozen={}, frozen_shardings={},
                 flops_per_step=3.0 * forward * b, examples_per_step=b,
                 tokens_per_step=tokens * b, describe=describe, evaluator=evaluator)
  return job


def run(config, workdir) -> dict:
  """Trains (config.mode='train') or evaluates one checkpoint (config.mode='eval')."""
  job = build_job(config)
  if config.get('mode', 'train') == 'eval':
    return loop.evaluate_only(config, workdir, job)
  return loop.train(config, workdir, job)
