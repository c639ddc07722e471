"""Every config field a run reads, with its default and a one-line doc: the one home of config
defaults.

A config file in configs/ starts from one of the job configs here and sets what differs:

    pretrain_config()              the `pretrain` job (BEiT-3 masked data modeling)
    tokenizer_config()             the `tokenizer` job (VQ-KD visual tokenizer training)
    finetune_config(task)          the `finetune` job (a task of `beit3_jax.tasks`)
    smoke_config(variant)          the `smoke` job (build the backbone, encode, print shapes)

The model (`config.model`) is a `beit3_jax.models.get_config` config and the tokenizer of the
tokenizer job (`config.tokenizer`) a `beit3_jax.tokenizers.get_vqkd_config` config: their fields
are declared, with their docs, beside the models (models/config.py, tokenizers/vqkd.py).

`check_fields(config)` refuses a config (a file's or after command-line overrides) with a field
the job does not declare, naming it with the closest declared field; it runs before anything
is built. Errors a user fixes in the config or on the command line are `ConfigError`s, which
`beit3_jax.main` prints as one message and exits with (no traceback).

`RESUMABLE_CHANGES` lists the fields a resumed run may change, and `defaults_for` gives the
declared defaults of a saved config's job, so that a field added to this module after a run
started counts as unchanged when the run resumes with its default (trainer/run_config.py).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping

import ml_collections

from beit3_jax.models import get_config as model_config
from beit3_jax.models.config import validate_config as validate_model_config
from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.tokenizers.vqkd import POS_RESIZE_MODES

# (dotted name, default, doc) of the fields every training job shares.
LOOP_FIELDS: tuple[tuple[str, Any, str], ...] = (
    ('seed', 0, 'parameters, data order and augmentation all follow from it'),
    ('total_steps', 1000, 'optimizer updates of the run (also the length of the lr schedule)'),
    ('checkpoint_every', 500, 'steps between async checkpoints (one is always written at the end)'),
    ('keep_checkpoints', 3, 'newest checkpoints kept'),
    ('log_every', 50, 'steps between lines of metrics.jsonl (averaged over those steps)'),
    ('eval_every', 500, 'steps between validation passes (0 = never; the last step always)'),
    ('eval_batches', 4, 'validation batches per pass (the same batches every time; '
     'fine-tuning: 0 = the whole split, every example once)'),
    ('mesh_shape', (-1, 1, 1), '(data, fsdp, tensor) device counts; -1 = the rest'),
    ('micro_batches', 1, 'gradient accumulation: the global batch is cut into this many slices'),
    ('init_from', '', "'' or a workdir / step dir / params dir to start from "
     '(trainer/checkpoints.py)'),
    ('peak_tflops_per_device', 0.0, 'for MFU where the device kind is not in trainer/flops.py'),
    ('stop_at_step', 0, '> 0: checkpoint and stop after this step (a planned interruption)'),
    ('tpu_slice', '', "the TPU slice the recipe is made for, e.g. 'v5p-128'; `python -m "
     "beit3_jax.plan` compiles for it when --topology is not given"),
    ('compilation_cache_dir', '', "'' = off; a directory (local or gs://) that keeps compiled "
     'steps, so that a restarted job does not compile again'),
    ('max_nonfinite_steps', 10, 'a run stops after this many steps in a row whose loss or '
     'gradient is not finite (each such step skips its update)'),
    ('workdir_lock_lease_seconds', 600.0, "lease of the workdir's run.lock, renewed while the "
     'run lives; a second run is refused until it expires (0 = no lock)'),
)

# Fields a resumed run may change: they decide how it runs, not what it computes.
RESUMABLE_CHANGES = ('mesh_shape', 'micro_batches', 'checkpoint_every', 'keep_checkpoints',
                     'log_every', 'eval_every', 'eval_batches', 'peak_tflops_per_device',
                     'data.read_threads', 'data.workers', 'data.on_bad_example', 'stop_at_step', 'tokenizer.train_if_missing',
                     'compilation_cache_dir', 'tpu_slice', 'model.remat', 'model.remat_policy',
                     'model.attention', 'teacher.variant', 'max_nonfinite_steps',
                     'workdir_lock_lease_seconds',
                     'model.init')   # only a fresh run draws its params

DATA_ON_BAD_EXAMPLE_DOC = (
    "an example that cannot be used (undecodable image, empty text): 'skip' counts it "
    "(skipped/<stream> in metrics.jsonl) and uses a randomly drawn one instead, 'stop' ends "
    'the run naming the stream and the record')

# Sub-configs whose keys are the user's to choose (checked by the code that reads them).
FREE_FORM = ('data.fields', 'data.splits')


def _build(fields: Iterable[tuple[str, Any, str]]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  for name, value, _ in fields:
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = value
  return config


def demo_model(**overrides) -> ml_collections.ConfigDict:
  """The demo model (configs/pretrain/demo.py and the fine-tuning demos): 4 layers, width 128,
  4 heads, 64 px images with 8 px patches, a 128-row vocabulary, 32-token texts, position
  tables at std 0.02."""
  fields = dict(embed_dim=128, depth=4, num_heads=4, mlp_dim=512, img_size=64, patch_size=8,
                vocab_size=128, max_text_positions=34, drop_path_rate=0.0,
                position_init_std=0.02)
  fields.update(overrides)
  return model_config('small', **fields)


def pretrain_fields() -> tuple[tuple[str, Any, str], ...]:
  """The `pretrain` job's fields: the paper's recipe at base size (arXiv 2208.10442, Table 11):
  AdamW b1 0.9, b2 0.98, eps 1e-6, peak lr 1e-3 after a 10k-step linear warmup, cosine decay,
  weight decay 0.05, clipping 3.0; 2048 images + 2048 texts + 2048 pairs a step; 40% of image
  patches masked block-wise, 15% of text tokens, 50% of caption tokens."""
  return LOOP_FIELDS + (
      ('job', 'pretrain', 'which job runs the config'),
      ('total_steps', 1_000_000, 'optimizer updates of the run'),
      ('checkpoint_every', 5000, 'steps between checkpoints'),
      ('log_every', 100, 'steps between metrics lines'),
      ('eval_every', 5000, 'steps between validation passes'),
      ('model', model_config('base', drop_path_rate=0.1, init='beit'),
       "the backbone (models/config.py); init 'beit', the paper's pretraining init"),
      ('tokenizer.path', '', 'VQ-KD params directory (convert to-flax --model vqkd, or the '
       'tokenizer job\'s output)'),
      ('tokenizer.train_config', '', "a tokenizer config whose output in <data dir>/tokenizers "
       "is the tokenizer when tokenizer.path is ''"),
      ('tokenizer.train_if_missing', False, 'train tokenizer.train_config first when its output '
       'does not exist yet (else: an error that names the command)'),
      ('data.data_dir', '', "'' = $BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax"),
      ('data.builtin_image_size', 64, 'image size of the built-in data set (px)'),
      ('data.image', 'imagenet2012', 'image stream: a TFDS name, or builtin:images'),
      ('data.text', '', "text stream: a TFDS name, builtin:text, or '' (none)"),
      ('data.pair', 'coco_captions', 'image-text stream: a TFDS name, or builtin:images'),
      ('data.fields', ml_collections.ConfigDict({'image': {}, 'text': {},
                                                  'pair': {'caption': 'captions/text'}}),
       'per stream: where its inputs live in an example (e.g. caption)'),
      ('data.train_split', 'train', 'TFDS split for training'),
      ('data.eval_split', 'validation', 'TFDS split for validation'),
      ('data.splits', ml_collections.ConfigDict(),
       "per stream, splits other than train_split / eval_split, e.g. {'text': {'train': "
       "'train[:99.9%]', 'eval': 'train[99.9%:]'}} for a data set without a validation split"),
      ('data.spm_path', '', 'SentencePiece model (beit3.spm for the released vocabulary)'),
      ('data.text_len', 64, 'tokens per text, <s> and </s> included'),
      ('data.image_mask_ratio', 0.4, 'share of image patches masked (block-wise)'),
      ('data.min_mask_block', 16, 'smallest masked block (patches)'),
      ('data.pair_image_mask_ratio', 0.0, 'share of pair-image patches masked (0: the paper '
       'does not say pair images are masked)'),
      ('data.text_mask_ratio', 0.15, 'share of text tokens masked'),
      ('data.pair_text_mask_ratio', 0.5, 'share of caption tokens masked'),
      ('data.crop_scale', (0.08, 1.0), 'RandomResizedCrop area range'),
      ('data.color_jitter', 0.4, 'colour jitter strength (0 = off)'),
      ('data.read_threads', 16, 'threads that make steps ahead (in each worker, if any)'),
      ('data.workers', 0, "worker processes that make the steps' batches (0 = in the "
       "trainer's process)"),
      ('data.on_bad_example', 'skip', DATA_ON_BAD_EXAMPLE_DOC),
      ('batch_size.image', 2048, 'images per step (global)'),
      ('batch_size.text', 2048, 'texts per step (global)'),
      ('batch_size.pair', 2048, 'image-text pairs per step (global)'),
      ('loss_weights.image', 1.0, 'weight of the image MIM loss'),
      ('loss_weights.text', 1.0, 'weight of the text MLM loss'),
      ('loss_weights.pair', 1.0, 'weight of the pair MLM loss'),
      ('loss_weights.pair_image', 1.0, 'weight of the pair MIM loss'),
      *_optimizer_fields(lr=1e-3, min_lr=1e-5, warmup_steps=10_000, b2=0.98, eps=1e-6,
                         weight_decay=0.05, clip_norm=3.0, layer_decay=1.0,
                         task_head_lr_weight=1.0),
  )


def _optimizer_fields(**values) -> tuple[tuple[str, Any, str], ...]:
  docs = dict(
      lr='peak learning rate', min_lr='learning rate at the end of the cosine decay',
      warmup_steps='linear warmup steps (from 0)', b1='AdamW beta1', b2='AdamW beta2',
      eps='AdamW epsilon', weight_decay='AdamW decoupled weight decay',
      clip_norm='global gradient-norm clipping (0 = off)',
      layer_decay='layer-wise lr decay (1 = off; unilm fine-tuning)',
      task_head_lr_weight='lr multiplier of the task head (unilm --task_head_lr_weight)',
      mu_dtype="dtype of Adam's first moment: 'float32', or 'bfloat16' to halve its memory")
  values = {'b1': 0.9, **values, 'mu_dtype': 'float32'}
  return tuple((f'optimizer.{k}', v, docs[k]) for k, v in values.items())


def tokenizer_fields() -> tuple[tuple[str, Any, str], ...]:
  """The `tokenizer` job's fields: BEiT v2's recipe (beit2/TOKENIZER.md): ImageNet-1k, batch
  512, AdamW b1 0.9 b2 0.99 weight decay 1e-4, 10 warmup epochs of 100 (lr 5e-5 per 256
  scaled to 1e-4 here), min crop scale 0.08, codebook 8192 x 32 with EMA decay 0.99."""
  return LOOP_FIELDS + (
      ('job', 'tokenizer', 'which job runs the config'),
      ('total_steps', 250_000, 'optimizer updates of the run'),
      ('checkpoint_every', 5000, 'steps between checkpoints'),
      ('log_every', 100, 'steps between metrics lines'),
      ('eval_every', 5000, 'steps between validation passes'),
      ('tokenizer', get_vqkd_config('base'), 'the VQ-KD model (tokenizers/vqkd.py)'),
      ('teacher.kind', 'vit', "the teacher whose features are reconstructed: 'pixel', 'beit3', "
       "'vit' or 'clip' (jobs/tokenizer_training.py)"),
      ('teacher.path', '', "the teacher's params directory ('beit3', 'vit' and 'clip'; a CLIP "
       'one is written by python -m beit3_jax.tokenizers.clip_convert)'),
      ('teacher.variant', '', "the teacher's size ('base', 'large'; for 'clip' 'vit_b16', "
       "'vit_l14') for `beit3_jax.plan` without teacher.path; a run reads the teacher from "
       'teacher.path'),
      ('teacher.cells', 2, "pooling cells of the 'pixel' teacher's features"),
      ('data.data_dir', '', "'' = $BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax"),
      ('data.builtin_image_size', 64, 'image size of the built-in data set (px)'),
      ('data.image', 'imagenet2012', 'images: a TFDS name, or builtin:images'),
      ('data.image_field', 'image', 'where the image lives in an example'),
      ('data.train_split', 'train', 'TFDS split for training'),
      ('data.eval_split', 'validation', 'TFDS split for validation'),
      ('data.crop_scale', (0.08, 1.0), 'RandomResizedCrop area range'),
      ('data.read_threads', 16, 'threads that make batches ahead (in each worker, if any)'),
      ('data.workers', 0, "worker processes that make the batches (0 = in the trainer's "
       'process)'),
      ('data.on_bad_example', 'skip', DATA_ON_BAD_EXAMPLE_DOC),
      ('batch_size', 512, 'images per step (global)'),
      *_optimizer_fields(lr=1e-4, min_lr=1e-5, warmup_steps=25_000, b2=0.99, eps=1e-8,
                         weight_decay=1e-4, clip_norm=0.0, layer_decay=1.0,
                         task_head_lr_weight=1.0),
      ('dead_code_fraction', 0.0, '> 0: restart codes used less than this share of the mean'),
      ('output', '', "where the trained tokenizer is exported ('' = <workdir>/tokenizer)"),
  )


def finetune_fields(task: str) -> tuple[tuple[str, Any, str], ...]:
  """The `finetune` job's fields. Optimizer defaults follow unilm's BEiT-3 fine-tuning (AdamW
  b2 0.999, weight decay 0.05, layer decay 0.65, label smoothing 0.1 for classification and
  captioning). Task-specific fields are read only by their task."""
  return LOOP_FIELDS + (
      ('job', 'finetune', 'which job runs the config'),
      ('mode', 'train', "'train'; 'eval': evaluate a checkpoint and stop; 'submit': write the "
       "evaluation server's file of data.eval_split (e.g. <workdir>/submit_vqav2_test.json)"),
      ('eval_batches', 0, 'validation batches per pass; 0 = the whole split, every example '
       'once (the last batch padded and masked), as unilm evaluates'),
      ('best_metric', '', "the validation metric whose best params are kept in <workdir>/best "
       "(higher is better): '' = the task's (classification, vqa, nlvr2: accuracy; retrieval: "
       "r_mean; captioning: cider), 'none' = keep no best"),
      ('eval_step', -1, 'mode=eval / submit: the checkpoint step (-1 = the newest)'),
      ('task', task, 'the task (a name of beit3_jax.tasks)'),
      ('model', model_config('base', drop_path_rate=0.1, normalize_output=False),
       'the backbone (models/config.py); unilm drops the final norm for some tasks'),
      ('num_classes', 4, 'classification: classes'),
      ('class_names', (), 'classification: optional class names (predict prints them)'),
      ('label_smoothing', 0.1, 'classification and captioning: label smoothing (captioning: '
       "unilm's form, s / (V - 1) on each other class)"),
      ('mixup', 0.0, 'classification: mixup alpha (0 = off; unilm ImageNet recipe 0.8)'),
      ('cutmix', 0.0, 'classification: cutmix alpha (0 = off; unilm ImageNet recipe 1.0)'),
      ('mixup_prob', 1.0, 'classification: probability of mixing a batch'),
      ('mixup_switch_prob', 0.5, 'classification: probability of cutmix instead of mixup'),
      ('answers', (), 'vqa: the answer vocabulary (() = the built-in ANSWERS)'),
      ('captioning.mask_prob', 0.6, 'captioning: share of caption tokens masked (unilm 0.6)'),
      ('captioning.drop_worst_ratio', 0.2, 'captioning: share of the highest-loss masked '
       'tokens left out of the training loss (unilm --drop_worst_ratio)'),
      ('captioning.drop_worst_after', 12000, 'captioning: steps before tokens are dropped '
       '(unilm --drop_worst_after; from step drop_worst_after + 1)'),
      ('captioning.beam_size', 3, 'captioning: beam size of evaluation and predict (unilm '
       '--num_beams 3)'),
      ('captioning.length_penalty', 0.6, 'captioning: score = log-prob / length ** this (unilm '
       '--length_penalty 0.6)'),
      ('captioning.max_len', 30, 'captioning: most generated tokens, eos included (unilm '
       '--num_max_bpe_tokens - 2: 30 for the recipe\'s 32, 62 for the script default 64)'),
      ('captioning.search', 'unilm', "captioning: 'unilm' (unilm's beam search, for beam_size 1 "
       "too) or 'k_finished' (K finished hypotheses; beam_size 1 = greedy); tasks/decoding.py"),
      ('captioning.min_len', 0, 'captioning: eos banned before this many tokens (unilm: 0)'),
      ('captioning.ban_pad', False, 'captioning: never generate the pad token (unilm: False)'),
      ('captioning.early_stopping', False, "captioning, search 'unilm': stop an example at its "
       'first finished hypothesis (unilm: False)'),
      ('captioning.eval_examples', 0, 'captioning: images captioned per evaluation '
       '(0 = eval_batches x batch_size)'),
      ('data.data_dir', '', "'' = $BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax"),
      ('data.builtin_image_size', 64, 'image size of the built-in data set (px)'),
      ('data.source', 'builtin:images', 'a TFDS name, or builtin:images / builtin:nlvr2'),
      ('data.fields', ml_collections.ConfigDict(), "where the task's inputs live in an example, "
       "overriding the task's defaults (e.g. {'label': 'label'})"),
      ('data.train_split', 'train', 'TFDS split for training'),
      ('data.eval_split', 'validation', 'TFDS split for validation'),
      ('data.caption_pairs', True, 'retrieval and captioning training: one example per (image, '
       'caption) pair, so an epoch has every caption once (unilm); False = one example per '
       'image, with one of its captions drawn at random'),
      ('data.spm_path', '', "SentencePiece model ('' = the built-in .spm for built-in data)"),
      ('data.text_len', 32, 'tokens per text, <s> and </s> included'),
      ('data.crop_scale', (0.5, 1.0), 'RandomResizedCrop area range in training'),
      ('data.flip_prob', 0.5, 'horizontal flip probability in training'),
      ('data.rand_augment', '', "training ops after the flip: '' = none; 'unilm' = unilm's "
       "RandomAugment(2, 7) of its VQA and captioning recipes (beit3/randaug.py); a timm "
       "RandAugment string, e.g. 'rand-m9-mstd0.5-inc1' (unilm's ImageNet recipe; fill "
       'round(255 * data.image_mean))'),
      ('data.random_erasing', 0.0, "classification: probability of timm's RandomErasing of a "
       "normalised training image, on the device (0 = off; unilm's ImageNet recipe 0.25)"),
      ('data.random_erasing_mode', 'pixel', "random erasing fill: 'pixel' per-pixel N(0, 1), "
       "'rand' one N(0, 1) colour per box, 'const' zeros (unilm --remode pixel)"),
      ('data.random_erasing_count', 1, 'random erasing: boxes per erased image (unilm --recount)'),
      ('data.eval_crop_pct', 0.0, "evaluation and predict view: 0 = resize to S x S (unilm's "
       'vision-language tasks); c > 0 = shorter side to int(S / c), centre crop S '
       "(unilm's ImageNet evaluation: 1.0)"),
      ('data.image_mean', (0.5, 0.5, 0.5), "image mean, [0, 1] units (unilm's VL tasks; "
       'ImageNet: IMAGENET_MEAN)'),
      ('data.image_std', (0.5, 0.5, 0.5), 'image std, [0, 1] units'),
      ('data.read_threads', 2, 'threads that make batches ahead (in each worker, if any)'),
      ('data.workers', 0, "worker processes that make the training batches (0 = in the "
       "trainer's process)"),
      ('data.on_bad_example', 'skip', DATA_ON_BAD_EXAMPLE_DOC),
      ('batch_size', 256, 'examples per step (global)'),
      *_optimizer_fields(lr=5e-4, min_lr=1e-6, warmup_steps=500, b2=0.999, eps=1e-8,
                         weight_decay=0.05, clip_norm=0.0, layer_decay=0.65,
                         task_head_lr_weight=1.0),
  )


def smoke_fields(variant: str = 'base') -> tuple[tuple[str, Any, str], ...]:
  """The `smoke` job's fields."""
  return (
      ('job', 'smoke', 'which job runs the config'),
      ('model', model_config(variant), 'the backbone (models/config.py)'),
      ('mesh_shape', (-1, 1, 1), '(data, fsdp, tensor) device counts; -1 = the rest'),
      ('seed', 0, 'parameters follow from it'),
      ('batch_size', 1, 'examples encoded'),
      ('sentence', 'a large red circle left of a small blue square', 'the text encoded'),
  )


def pretrain_config() -> ml_collections.ConfigDict:
  """An unlocked config of every `pretrain` field (see `pretrain_fields`)."""
  return _build(pretrain_fields())


def tokenizer_config() -> ml_collections.ConfigDict:
  """An unlocked config of every `tokenizer` field (see `tokenizer_fields`)."""
  return _build(tokenizer_fields())


def finetune_config(task: str) -> ml_collections.ConfigDict:
  """An unlocked config of every `finetune` field for `task` (see `finetune_fields`)."""
  return _build(finetune_fields(task))


def smoke_config(variant: str = 'base') -> ml_collections.ConfigDict:
  """An unlocked config of every `smoke` field."""
  return _build(smoke_fields(variant))


def loop_fields(config: ml_collections.ConfigDict) -> None:
  """Sets the fields every training job shares to their defaults on `config`."""
  config.update(_build(LOOP_FIELDS))


def _fields_of(job: str, task: str) -> tuple[tuple[str, Any, str], ...]:
  makers = {'pretrain': pretrain_fields, 'tokenizer': tokenizer_fields,
            'finetune': lambda: finetune_fields(task), 'smoke': smoke_fields}
  if job not in makers:
    raise ConfigError(f"config.job={job!r}; known jobs: {', '.join(makers)}.")
  return makers[job]()


def docs(job: str, task: str = '') -> dict[str, str]:
  """Dotted field name -> its one-line doc, for a job."""
  return {name: doc for name, _, doc in _fields_of(job, task)}


def defaults_for(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict:
  """The declared defaults (a plain dict) of the job of `config` (a ConfigDict or a saved
  config.json dict with `job`, and `task` for fine-tuning)."""
  job = config.get('job', '')
  built = _build(_fields_of(job, config.get('task', '') or ''))
  return built.to_dict()


def _leaves(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and name not in FREE_FORM and value:
      out.update(_leaves(value, f'{name}.'))
    else:
      out[name] = value
  return out


class ConfigError(ValueError):
  """A config a run cannot start from, with a message that says what to do instead:
  `beit3_jax.main` prints the message and exits (no traceback)."""


class RunError(RuntimeError):
  """What stops a started run (no readable checkpoint, a loss that stays non-finite), with a
  message that says what happened and what to do: `beit3_jax.main` prints it and exits with
  status 1 (no traceback)."""


class UnknownFieldError(ConfigError):
  """A config field the job does not declare."""


_POSITIVE = ('total_steps', 'log_every', 'micro_batches', 'keep_checkpoints')
_NON_NEGATIVE = ('checkpoint_every', 'eval_every', 'eval_batches', 'stop_at_step',
                 'max_nonfinite_steps', 'workdir_lock_lease_seconds')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError, one line naming the field, for a value no run can start with: a
  non-positive step count or batch, a warmup as long as the run, a model whose image size the
  patch does not divide (and the model's other inconsistencies). Batches that do not divide
  the mesh's data-parallel axes are refused by the jobs, which know the mesh."""
  def number(name):
    value = config
    for part in name.split('.'):
      value = value[part]
    return value

  def present(name):
    node = config
    for part in name.split('.'):
      if part not in node:
        return False
      node = node[part]
    return True

  for name in _POSITIVE:
    if present(name) and number(name) is not None and not number(name) > 0:
      raise ConfigError(f'{name}={number(name)}: expected a number > 0.')
  for name in _NON_NEGATIVE:
    if present(name) and not number(name) >= 0:
      raise ConfigError(f'{name}={number(name)}: expected a number >= 0.')
  if present('batch_size'):
    sizes = config.batch_size
    sizes = dict(sizes.items()) if hasattr(sizes, 'items') else {'': sizes}
    for stream, b in sizes.items():
      field = f'batch_size.{stream}' if stream else 'batch_size'
      if int(b) != b or b < 0 or (not stream and b == 0):
        raise ConfigError(f'{field}={b}: expected a whole number '
                          + ('>= 0 (0 turns the stream off).' if stream else '> 0.'))
    if not any(sizes.values()):
      raise ConfigError('batch_size: every stream is 0; give at least one a batch.')
  if present('eval_batches') and config.eval_batches == 0 and present('job') \
      and config.job != 'finetune' and present('eval_every') and config.eval_every:
    raise ConfigError(f'eval_batches=0 (the whole split) is for fine-tuning; job '
                      f'{config.job!r} validates on eval_batches fixed batches: give 1 or more.')
  if present('optimizer.warmup_steps') and present('total_steps'):
    if not 0 <= config.optimizer.warmup_steps < config.total_steps:
      raise ConfigError(f'optimizer.warmup_steps={config.optimizer.warmup_steps}: expected '
                        f'0 <= warmup_steps < total_steps={config.total_steps}.')
  if present('model'):
    try:
      validate_model_config(config.model)
    except ValueError as e:
      raise ConfigError(f'model: {e}') from None
  if present('tokenizer.input_size') and present('tokenizer.patch_size'):
    if config.tokenizer.input_size % config.tokenizer.patch_size:
      raise ConfigError(f'tokenizer.input_size={config.tokenizer.input_size} is not a multiple '
                        f'of tokenizer.patch_size={config.tokenizer.patch_size}.')
  if present('tokenizer.pos_resize') and config.tokenizer.pos_resize not in POS_RESIZE_MODES:
    raise ConfigError(f'tokenizer.pos_resize={config.tokenizer.pos_resize!r}: expected one of '
                      f'{POS_RESIZE_MODES}.')


def check_fields(config: ml_collections.ConfigDict, source: str = 'the config') -> None:
  """Raises UnknownFieldError naming every field of `config` that its job does not declare
  (with the closest declared name). The fields of sub-configs declared whole (the model, the
  tokenizer job's VQ-KD) are those of their `get_config` (the same for every variant)."""
  job = config.get('job', '')
  fields = _fields_of(job, config.get('task', '') or '')
  declared = set()
  for name, value, _ in fields:
    if isinstance(value, ml_collections.ConfigDict) and name not in FREE_FORM:
      declared.update(f'{name}.{leaf}' for leaf in _leaves(value.to_dict()))
    else:
      declared.add(name)
  unknown = []
  for name in _leaves(config.to_dict()):
    if name in declared or any(name.startswith(f'{f}.') for f in FREE_FORM):
      continue
    unknown.append(name)
  if unknown:
    lines = []
    for name in sorted(unknown):
      close = difflib.get_close_matches(name, sorted(declared), n=1)
      lines.append(f'{name}' + (f' (did you mean {close[0]}?)' if close else ''))
    raise UnknownFieldError(f'{source} sets field(s) the {job} job does not have: '
                            + '; '.join(lines) + '. Every field is declared in '
                            'beit3_jax/defaults.py.')


def config_module(path: str):
  """The executed module of a config file (a .py with `get_config()`, as `--config=` takes)."""
  if not os.path.isfile(path):
    raise ConfigError(f'No config file at {path}.')
  spec = importlib.util.spec_from_file_location(
      '_beit3_config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py[:arg]`: `get_config(arg)`, or `get_config()` without an arg (as
  ml_collections' config flag calls it)."""
  path, _, arg = spec.partition(':')
  module = config_module(path)
  return module.get_config(arg) if arg else module.get_config()
