r"""unilm's BEiT-3 fine-tuning recipes at the released sizes: one function per task.

`configs/finetune/{task}_{size}.py` (size: base or large) are thin wrappers around
`classification`, `vqa`, `nlvr2`, `retrieval` and `captioning` here; each file keeps the
command to run and the result to expect, the recipe itself lives here once. The values a
get_started command sets are in one table per task (`CLASSIFICATION`, `VQA`, `NLVR2`,
`RETRIEVAL`, `CAPTIONING`: a `Command` per size), cited next to the values: unilm
beit3/get_started/get_started_for_<task>.md, "the base / large command". What those commands
do not set are defaults of unilm beit3/run_beit3_finetuning.py (`UNILM_DEFAULTS`).

What every recipe shares:
- Model (`model`): the released size with unilm's 64,010-row vocabulary, bfloat16 compute,
  the task's --input_size and --drop_path, --checkpoint_activations as model.remat. unilm's
  classification and VQA models have no final backbone norm (normalize_output=False,
  `Task.normalize_output`); the NLVR2, retrieval and captioning models keep it.
- Schedule (`schedule`): epochs -> steps as unilm's `cosine_scheduler`: steps per epoch =
  training examples // batch (`steps_per_epoch`; the example counts are `TRAIN_EXAMPLES`);
  validation (of the whole split, eval_batches=0: every example once, the last batch padded
  and masked) and a checkpoint every epoch.
- Data (`vision_language_data` for the tasks with text): the project's TFDS builders
  (beit3_jax/data/builders), prepared once from the official files (nothing is downloaded;
  each task function names its command); 16 read threads. `data.spm_path` stays '': pass
  unilm's `beit3.spm` as --config.data.spm_path. Add --config.data.data_dir=DIR if the data
  was prepared outside the default data dir.
- Weights: unilm's .pth files, downloaded by you and converted (README "Weights from and to
  PyTorch"). `init_from` may also be a pretraining workdir of ours (configs/pretrain/SIZE.py):
  its backbone is taken, the heads start fresh.

Position tables. unilm's pretrained weights are 224 px; the recipes at 384 or 480 px start
from them as they are: init_from resizes the vision position table on load (bicubic, as
unilm's `load_model_and_may_interpolate`) when the stored one is for another image size, and
prints so. Every other leaf must have the model's shape. Convert once (SIZE: base or large):
    python -m beit3_jax.convert to-flax beit3_SIZE_patch16_224.pth ckpt/beit3_SIZE \
        --variant SIZE
and pass ckpt/beit3_SIZE as init_from (a pretraining workdir of ours is resized the same way).
For weights with task heads (the ITC-tuned retrieval weights):
    python -m beit3_jax.convert to-flax beit3_SIZE_itc_patch16_224.pth ckpt/beit3_SIZE_itc \
        --variant SIZE --task retrieval
and pass ckpt/beit3_SIZE_itc. For a resized copy on disk, `models.resize_vision_positions`
does it by hand.

Deviations from unilm in every recipe: the linear warmup from 0 reaches the peak lr at step W
(optax), unilm's `np.linspace(0, lr, W)` at step W - 1; bfloat16 compute instead of DeepSpeed
fp16. Each task function lists its own; unilm's recipes use no EMA. (unilm's warmup starts at 0
too: run_beit3_finetuning.py declares --warmup_lr 1e-6 but never passes it to
utils.cosine_scheduler, whose start_warmup_value stays 0.)
"""

from __future__ import annotations

import dataclasses
import json
import logging

from etils import epath
import ml_collections

from beit3_jax.data import image_ops
from beit3_jax.data import paths
from beit3_jax.models import get_config as model_config
from beit3_jax.defaults import demo_model, finetune_config
from beit3_jax.tasks import registry

SIZES = ('base', 'large')
VOCAB_SIZE = 64010                      # beit3.spm + fairseq's offset (unilm's vocab_size)

# unilm beit3/run_beit3_finetuning.py defaults, for what the get_started commands leave out.
UNILM_DEFAULTS = dict(
    min_lr=1e-6,                        # --min_lr
    eps=1e-8,                           # --opt_eps
    clip_norm=0.0,                      # --clip_grad None
    text_len=64,                        # --num_max_bpe_tokens
    label_smoothing=0.1,                # --smoothing (classification), --label_smoothing
    mixup_prob=1.0,                     # --mixup_prob
    mixup_switch_prob=0.5,              # --mixup_switch_prob
    beam_size=3,                        # --num_beams
    length_penalty=0.6,                 # --length_penalty
)

# Training examples per epoch (unilm's len(dataset)), by TFDS data set.
TRAIN_EXAMPLES = {
    'beit3_imagenet2012': 1_281_167,    # ImageNet-1k train images
    'beit3_vqav2/default': 650_000,     # questions, an estimate: see `vqa`
    'beit3_nlvr2': 86_373,              # lil-lab/nlvr nlvr2/data/train.json statements
    # Karpathy train (+ restval for COCO) image-caption pairs, unilm's retrieval and
    # captioning items: 566,747 captions of 113,287 COCO images (dataset_coco.json) and
    # 145,000 captions of 29,000 Flickr30k images.
    'beit3_coco_karpathy': 566_747,
    'beit3_flickr30k_karpathy': 145_000,
}


# The slice a fine-tuning recipe is made for unless its command names another
# (`python -m beit3_jax.plan` plans each recipe there; docs/performance.md has the plans, on
# v4-8 too).
TPU_SLICE = 'v5p-8'


@dataclasses.dataclass(frozen=True)
class Command:
  """What one unilm get_started command sets (the rest: `UNILM_DEFAULTS`)."""
  batch_size: int                       # GPUs x --batch_size
  epochs: int                           # --epochs
  warmup_epochs: int                    # --warmup_epochs
  lr: float                             # --lr
  layer_decay: float                    # --layer_decay
  weight_decay: float                   # --weight_decay
  drop_path: float                      # --drop_path
  remat: bool = False                   # --checkpoint_activations
  betas: tuple[float, float] = (0.9, 0.999)   # --opt_betas (the script's default)
  # --task_head_lr_weight: the head's lr x this (unilm applies it only with --layer_decay 1.0)
  task_head_lr_weight: float = 1.0
  tpu_slice: str = TPU_SLICE            # where the batch fits (not a unilm setting)


def _sizes(both: dict, **by_size: dict) -> dict[str, Command]:
  """{size: Command} from the values both commands share and each size's own."""
  return {size: Command(**both, **own) for size, own in by_size.items()}


# get_started_for_image_classification.md. Both: 8 GPUs x --batch_size 128, --epochs 50
# --warmup_epochs 5, --weight_decay 0.05 (and --mixup 0.8 --cutmix 1.0, see `classification`).
CLASSIFICATION = _sizes(
    dict(batch_size=1024, epochs=50, warmup_epochs=5, weight_decay=0.05),
    base=dict(lr=7e-4, layer_decay=0.65, drop_path=0.15),
    large=dict(lr=2e-4, layer_decay=0.8, drop_path=0.25, remat=True))

# get_started_for_vqav2.md. Both: --input_size 480, 8 GPUs x --batch_size 16, --epochs 10
# --warmup_epochs 1, --layer_decay 1.0, --weight_decay 0.01, --opt_betas 0.9 0.98,
# --task_head_lr_weight 20, --randaug (data.rand_augment='unilm': see `vqa`).
VQA = _sizes(
    dict(batch_size=128, epochs=10, warmup_epochs=1, layer_decay=1.0, weight_decay=0.01,
         betas=(0.9, 0.98), task_head_lr_weight=20.0),
    base=dict(lr=3e-5, drop_path=0.1),
    large=dict(lr=2e-5, drop_path=0.15, remat=True))

# get_started_for_nlvr2.md. Both: 8 GPUs x --batch_size 32, --epochs 20 --warmup_epochs 5,
# --drop_path 0.2, --weight_decay 0.2. The -indomain weights take --lr 5e-4 (base) / 1e-4
# (large) instead.
NLVR2 = _sizes(
    dict(batch_size=256, epochs=20, warmup_epochs=5, drop_path=0.2, weight_decay=0.2),
    base=dict(lr=7e-4, layer_decay=0.65),
    large=dict(lr=3e-4, layer_decay=0.85, remat=True))

# get_started_for_retrieval.md, by data set. All: --input_size 384, batch 3072 (base: 16
# GPUs x --batch_size 192; large: 2 nodes x 16 GPUs x --batch_size 96), --drop_path 0.2,
# --weight_decay 0.05, --checkpoint_activations; COCO --epochs 15 --warmup_epochs 3,
# Flickr30k --epochs 20 --warmup_epochs 5. The doc gives the Flickr30k --lr 1e-4 for base
# only; large keeps its --lr 5e-5.
_RETRIEVAL = dict(batch_size=3072, drop_path=0.2, weight_decay=0.05, remat=True)
# Large's 3072 examples at 384 px need 114 GiB per chip on v5p-8's 4 chips even with full
# remat (docs/performance.md); unilm spreads them over 32 GPUs, 96 each. Here: 8 chips, 384 each.
_RETRIEVAL_LARGE_SLICE = 'v5p-16'
RETRIEVAL = {
    'coco': _sizes(dict(_RETRIEVAL, epochs=15, warmup_epochs=3),
                   base=dict(lr=2e-4, layer_decay=0.65),
                   large=dict(lr=5e-5, layer_decay=0.85, tpu_slice=_RETRIEVAL_LARGE_SLICE)),
    'flickr30k': _sizes(dict(_RETRIEVAL, epochs=20, warmup_epochs=5),
                        base=dict(lr=1e-4, layer_decay=0.65),
                        large=dict(lr=5e-5, layer_decay=0.85,
                                   tpu_slice=_RETRIEVAL_LARGE_SLICE)),
}
RETRIEVAL_SOURCES = {'coco': 'beit3_coco_karpathy', 'flickr30k': 'beit3_flickr30k_karpathy'}

# get_started_for_captioning.md. Both: --input_size 480, 8 GPUs x --batch_size 32, --epochs 10
# --warmup_epochs 1, --layer_decay 1.0, --drop_path 0.1, --weight_decay 0.05,
# --checkpoint_activations (and --num_max_bpe_tokens 32, --captioning_mask_prob 0.7,
# --randaug, drop-worst: see `captioning`).
CAPTIONING = _sizes(
    dict(batch_size=256, epochs=10, warmup_epochs=1, layer_decay=1.0, drop_path=0.1,
         weight_decay=0.05, remat=True),
    base=dict(lr=4e-5),
    large=dict(lr=8e-6))


# ------------------------------------------------------------------------------------------
# Shared parts.

def steps_per_epoch(source: str, batch_size: int) -> int:
  """unilm's `cosine_scheduler` steps per epoch: len(data_loader_train) = examples // batch."""
  return TRAIN_EXAMPLES[source] // batch_size


def model(size: str, command: Command, img_size: int,
          normalize_output: bool) -> ml_collections.ConfigDict:
  """unilm's beit3_<size>_patch16_<img_size>_<task> model, with scanned layers (one layer to
  compile; converted unilm weights are restacked when they load)."""
  return model_config(size, img_size=img_size, drop_path_rate=command.drop_path,
                      normalize_output=normalize_output, vocab_size=VOCAB_SIZE,
                      dtype='bfloat16', remat=command.remat, scan_layers=True)


def start(task: str, size: str, command: Command, img_size: int,
          normalize_output: bool) -> ml_collections.ConfigDict:
  """finetune_config(task) with the recipe's model; init_from is the user's to pass."""
  if size not in SIZES:
    raise ValueError(f'size={size!r}; expected one of {SIZES}.')
  registry.get(task)
  config = finetune_config(task)
  config.model = model(size, command, img_size, normalize_output)
  config.init_from = ''
  config.tpu_slice = command.tpu_slice
  return config


def data_source(config, source: str, fields: dict[str, str]) -> None:
  """The TFDS data set, where the task's inputs live in it, its splits (train, validation),
  flips and read threads."""
  d = config.data
  d.source = source
  d.fields.update(fields)
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.spm_path = ''
  d.flip_prob = 0.5
  d.read_threads = 0
  d.workers = 32   # worker processes on each host (a v5p host has 208 vCPUs)


def vision_language_data(config, source: str, fields: dict[str, str],
                         text_len: int = UNILM_DEFAULTS['text_len']) -> None:
  """unilm's vision-language input (datasets.py build_transform): RandomResizedCrop scale
  (0.5, 1) + flip, IMAGENET_INCEPTION_MEAN / STD, `text_len` text tokens."""
  data_source(config, source, fields)
  d = config.data
  d.text_len = text_len
  d.crop_scale = (0.5, 1.0)
  d.image_mean = (0.5, 0.5, 0.5)
  d.image_std = (0.5, 0.5, 0.5)


def schedule(config, command: Command, *, log_every: int) -> None:
  """Batch, AdamW and the warmup + cosine steps of `command` over config.data.source; a
  validation of the whole split and a checkpoint every epoch."""
  epoch = steps_per_epoch(config.data.source, command.batch_size)
  config.batch_size = command.batch_size
  o = config.optimizer
  o.lr = command.lr
  o.min_lr = UNILM_DEFAULTS['min_lr']
  o.warmup_steps = command.warmup_epochs * epoch
  o.weight_decay = command.weight_decay
  o.layer_decay = command.layer_decay
  o.task_head_lr_weight = command.task_head_lr_weight
  o.b1, o.b2 = command.betas
  o.eps = UNILM_DEFAULTS['eps']
  o.clip_norm = UNILM_DEFAULTS['clip_norm']
  config.total_steps = command.epochs * epoch
  config.eval_every = epoch
  config.eval_batches = 0
  config.checkpoint_every = epoch
  config.log_every = log_every


def demo_config(task: str) -> ml_collections.ConfigDict:
  """What the `configs/finetune/<task>_demo.py` configs share: the demo pretraining's model
  (`defaults.demo_model`; without the final norm where unilm's task model drops it) started
  from its run in workdirs/demo, batches of 32 of the built-in data (64 px, 24 text tokens),
  AdamW with warmup + cosine. Each demo config sets its steps, learning rate and task fields."""
  spec = registry.get(task)
  config = finetune_config(task)
  config.init_from = 'workdirs/demo'
  config.model = demo_model(normalize_output=spec.normalize_output)
  config.data.source = spec.builtin_source
  config.data.text_len = 24
  config.data.crop_scale = (0.8, 1.0)
  config.data.read_threads = 2
  config.batch_size = 32
  config.total_steps = 300
  config.checkpoint_every = 300
  config.log_every = 25
  config.eval_every = 150
  config.eval_batches = 0             # the whole split: 224 validation examples
  config.optimizer.lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.warmup_steps = 20
  config.optimizer.layer_decay = 1.0
  config.label_smoothing = 0.1
  config.captioning.max_len = 20
  return config


# ------------------------------------------------------------------------------------------
# The tasks at the released sizes.

def classification(size: str) -> ml_collections.ConfigDict:
  r"""ImageNet-1k classification at 224 px (`CLASSIFICATION`), the model
  `beit3_<size>_patch16_224_imageclassification` (no final norm).

  Besides the table: mixup 0.8 / cutmix 1.0 (get_started); unilm's defaults: label smoothing
  0.1, mixup_prob 1.0, mixup_switch_prob 0.5, AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no
  gradient clipping. Steps: 1,281,167 train images // 1024 = 1251
  per epoch, 50 epochs = 62,550 steps, 5 warmup epochs = 6,255. Validation every epoch on 48
  batches (49,152 of the 50,000 validation images).

  Data: the TFDS data set `beit3_imagenet2012` (features image, label; splits train /
  validation), from the official files (layout in beit3_jax/data/builders/imagenet.py):
      python -c "from beit3_jax.data.builders import imagenet; \
          imagenet.prepare(manual_dir='/data/imagenet')"
  Weights: unilm's beit3_<size>_patch16_224.pth converted, at 224 px as they are.

  Validation view as unilm's `build_imagenet_transform`: the shorter side resized (bicubic) to
  int(224 / crop_pct), crop_pct 1.0, then the centre 224 x 224 (data.eval_crop_pct).

  Training view as timm's `create_transform` (unilm's build_transform for ImageNet):
  RandomResizedCrop (scale 0.08-1, bicubic), flip, RandAugment rand-m9-mstd0.5-inc1
  (data.rand_augment; timm drops the colour jitter when it is set), and random erasing after
  normalisation (data.random_erasing 0.25, mode pixel, 1 box; on the device:
  `data.augment.erase_on_device`).

  Deviations: only those of every recipe here.
  """
  command = CLASSIFICATION[size]
  config = start('classification', size, command, 224, normalize_output=False)
  config.num_classes = 1000
  config.label_smoothing = UNILM_DEFAULTS['label_smoothing']
  config.mixup = 0.8                    # get_started: --mixup 0.8
  config.cutmix = 1.0                   # get_started: --cutmix 1.0
  config.mixup_prob = UNILM_DEFAULTS['mixup_prob']
  config.mixup_switch_prob = UNILM_DEFAULTS['mixup_switch_prob']
  data_source(config, 'beit3_imagenet2012', {'image': 'image', 'label': 'label'})
  config.data.crop_scale = (0.08, 1.0)  # timm create_transform's RandomResizedCrop
  config.data.eval_crop_pct = 1.0      # build_imagenet_transform: crop_pct None -> 1.0
  config.data.rand_augment = 'rand-m9-mstd0.5-inc1'   # --aa (timm RandAugment)
  config.data.random_erasing = 0.25     # --reprob, --remode pixel, --recount 1
  config.data.image_mean = image_ops.IMAGENET_MEAN   # IMAGENET_DEFAULT_MEAN / STD
  config.data.image_std = image_ops.IMAGENET_STD
  schedule(config, command, log_every=100)
  return config


VOCABULARY_FILE = 'answer_vocabulary.json'   # beit3_jax.data.builders.vqa_nlvr2


def answer_vocabulary(arg, config_file: str):
  """(answers, data dir or None): the beit3_vqav2 answer vocabulary from `arg` (a project data
  dir, or an answer_vocabulary.json), else from the default data dir; () if none is found
  there (an error, naming `config_file` for how to prepare it, if `arg` names a place
  without one)."""
  if arg and str(arg).endswith('.json'):
    files, data_dir = [epath.Path(arg)], None
  else:
    root = epath.Path(paths.tfds_dir(arg or None)) / 'beit3_vqav2' / 'default'
    files = sorted(root.glob(f'*/{VOCABULARY_FILE}')) if root.exists() else []
    data_dir = arg or None
  files = [f for f in files if f.exists()]
  if not files:
    if arg:
      raise FileNotFoundError(f'No {VOCABULARY_FILE} at {arg!r}: prepare beit3_vqav2 there '
                              f'(see {config_file}).')
    logging.warning('No beit3_vqav2 %s in the default data dir: config.answers is () (the '
                    'built-in data\'s answers); pass the data dir as --config=<file>:DIR.',
                    VOCABULARY_FILE)
    return (), None
  return tuple(json.loads(files[-1].read_text())), data_dir


def vqa(size: str, arg=None) -> ml_collections.ConfigDict:
  r"""VQAv2 at 480 px (`VQA`), the model `beit3_<size>_patch16_480_vqav2` (no final norm).

  `arg` (the config file's `:ARG`) is the project data dir the data was prepared in: the
  answer vocabulary is read from it (3129 answers, min count 9, as unilm) and data.data_dir
  set to it; it may also be the path of an answer_vocabulary.json. Without it the default
  data dir is looked in, and if no vocabulary is there `answers` stays () -- the built-in
  data's 18 answers -- with a warning: do not train so.

  unilm's defaults besides the table: eps 1e-8, min lr 1e-6, no gradient clipping, 64 text
  tokens. Training data as unilm's VQAv2Dataset: the train2014 questions and the val2014
  questions of all but 1000 held-out images, without questions that have no answer in the
  3129-answer vocabulary. Steps with 650,000 training questions, an estimate: 443,757
  train2014 + 214,354 val2014 questions (visualqa.org) = 658,111, minus about 5.3k questions
  of the 1000 held-out images, minus the questions without an in-vocabulary answer (the real
  count: len(builder.as_data_source('train'))). 650,000 // 128 = 5078 steps per epoch: 10
  epochs = 50,780 steps, 1 warmup epoch = 5,078. Validation (every epoch) covers the
  held-out split (about 5.3k questions; up to 50 batches).

  Data: the TFDS data set `beit3_vqav2/default` (features image_bytes, question,
  multiple_choice_answer, answers, answer_ids, answer_scores; splits train / validation = the
  1000 held-out val2014 images / test = test2015), from the official files (layout in
  beit3_jax/data/builders/vqa_nlvr2.py: the question and annotation JSON files at the top of
  the manual dir, next to train2014/ val2014/ test2015/). It also writes the answer
  vocabulary, `answer_vocabulary.json`:
      python -c "from beit3_jax.data.builders import vqa_nlvr2; \
          vqa_nlvr2.prepare('vqav2', manual_dir='/data/vqa', data_dir='/data/beit3')"
  Weights: unilm's beit3_<size>_patch16_224.pth converted as ckpt/beit3_<size>; its position
  table is resized to 480 px on load (the module's "Position tables").

  The task head (`head/...`, not the pooler) trains at 20x the backbone's lr, unilm's
  --task_head_lr_weight 20 (optimizer.task_head_lr_weight).

  Training view as unilm's build_transform with --randaug: RandomResizedCrop (scale 0.5-1,
  bicubic), flip, RandomAugment(2, 7) of unilm's randaug.py (data.rand_augment='unilm').

  Deviations: the 1000 held-out images are chosen by hash, not unilm's random draw.

  Targets and metric as unilm: BCE against the soft scores of the 10 annotator answers
  (answer_ids / answer_scores: 0.3 / 0.6 / 0.9 / 1.0 by annotator count); the validation
  accuracy is the soft score of the arg-max answer, unilm's VQA score. Validation questions
  without any in-vocabulary answer are kept and score 0.
  """
  command = VQA[size]
  config = start('vqa', size, command, 480, normalize_output=False)
  answers, data_dir = answer_vocabulary(arg, f'configs/finetune/vqa_{size}.py')
  config.answers = answers
  if data_dir:
    config.data.data_dir = str(data_dir)
  vision_language_data(config, 'beit3_vqav2/default', {
      'image': 'image_bytes', 'question': 'question', 'answer': 'multiple_choice_answer',
      'answer_ids': 'answer_ids', 'answer_scores': 'answer_scores'})
  config.data.rand_augment = 'unilm'    # --randaug: RandomAugment(2, 7) of randaug.py
  schedule(config, command, log_every=100)
  return config


def nlvr2(size: str) -> ml_collections.ConfigDict:
  r"""NLVR2 (visual reasoning over image pairs) at 224 px (`NLVR2`), the model
  `beit3_<size>_patch16_224_nlvr2` (final norm kept).

  unilm's defaults besides the table: AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no gradient
  clipping, 64 text tokens. Steps: 86,373 train statements // 256 = 337 per epoch, 20 epochs =
  6,740 steps, 5 warmup epochs = 1,685. Validation every epoch on the dev split: 27 batches
  = 6,912 of its 6,982 examples (the config file gives the command that scores test-P).

  Data: the TFDS data set `beit3_nlvr2` (features image_a_bytes, image_b_bytes, statement,
  label; splits train / validation = dev / test = test1, i.e. test-P), from the official files
  (layout in beit3_jax/data/builders/vqa_nlvr2.py: train.json / dev.json / test1.json and the
  images):
      python -c "from beit3_jax.data.builders import vqa_nlvr2; \
          vqa_nlvr2.prepare('nlvr2', manual_dir='/data/nlvr2')"
  Weights: unilm's beit3_<size>_patch16_224.pth converted, at 224 px as they are.

  Deviations: only the shared ones (unilm's NLVR2 recipe uses no RandAugment).
  """
  command = NLVR2[size]
  config = start('nlvr2', size, command, 224, normalize_output=True)
  vision_language_data(config, 'beit3_nlvr2', {
      'image_a': 'image_a_bytes', 'image_b': 'image_b_bytes', 'statement': 'statement',
      'label': 'label'})
  schedule(config, command, log_every=50)
  return config


def retrieval(size: str, dataset: str | None = None) -> ml_collections.ConfigDict:
  r"""Image-text retrieval at 384 px on `dataset`, 'coco' (None) or 'flickr30k' (`RETRIEVAL`),
  the model `beit3_<size>_patch16_384_retrieval` (final norm kept), from the ITC-tuned
  `beit3_<size>_itc_patch16_224.pth`.

  unilm's defaults besides the table: AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no gradient
  clipping, 64 text tokens. unilm's training set has one item per image-caption pair, so the
  steps count pairs: COCO 566,747 // 3072 = 184 per epoch -> 2,760 steps, 552 warmup;
  Flickr30k 145,000 // 3072 = 47 -> 940 steps, 235 warmup. Here too an example
  is one image-caption pair (data.caption_pairs), so an epoch is unilm's. Validation every
  epoch over the whole validation split (5,000 COCO / 1,014 Flickr30k images with all their
  captions).

  Data: the TFDS data sets `beit3_coco_karpathy` / `beit3_flickr30k_karpathy` (features
  image_bytes, captions, ...; splits train = train + restval / validation / test), from
  Karpathy's dataset_coco.json / dataset_flickr30k.json and the images (layout in
  beit3_jax/data/builders/karpathy_captions.py):
      python -c "from beit3_jax.data.builders import karpathy_captions as k; \
          k.prepare('coco', manual_dir='/data/coco')"   # or 'flickr30k', '/data/flickr30k'
  Weights: unilm's ITC-tuned weights converted with their retrieval heads as
  ckpt/beit3_<size>_itc; its position table is resized to 384 px on load (the module's
  "Position tables"). From a backbone only
  (beit3_<size>_patch16_224.pth or a pretraining workdir) the heads start fresh, and unilm's
  ITC intermediate tuning is missing.

  Deviations: only those of every recipe here (unilm's retrieval recipe uses no RandAugment).
  """
  dataset = dataset or 'coco'
  if dataset not in RETRIEVAL:
    raise ValueError(f'retrieval config argument {dataset!r}; expected one of '
                     f'{sorted(RETRIEVAL)}.')
  command = RETRIEVAL[dataset][size]
  config = start('retrieval', size, command, 384, normalize_output=True)
  vision_language_data(config, RETRIEVAL_SOURCES[dataset],
                       {'image': 'image_bytes', 'captions': 'captions'})
  schedule(config, command, log_every=20)
  return config


def captioning(size: str) -> ml_collections.ConfigDict:
  r"""COCO captioning (Karpathy splits) at 480 px (`CAPTIONING`), the model
  `beit3_<size>_patch16_480_captioning` (final norm kept).

  get_started besides the table: 32 text tokens (--num_max_bpe_tokens 32), mask prob 0.7
  (--captioning_mask_prob 0.7; the paper's Table 13 and the script default say 0.6),
  RandAugment(2, 7) (--randaug: data.rand_augment='unilm'), drop-worst after 12,000 steps
  (captioning.drop_worst_after; the 20% highest-loss masked tokens of a step leave its loss
  from step 12,001, as unilm's --drop_worst_ratio 0.2). unilm's defaults: label smoothing 0.1
  in unilm's form (1 - s on the label, s / (V - 1) on each other class, the KL divergence
  summed: `losses.captioning_token_losses`), beam 3, length penalty 0.6 with unilm's beam
  search (`decoding.beam_search`, style 'unilm'; at most 30 generated tokens:
  --num_max_bpe_tokens 32 less the bos and the final mask), AdamW (0.9, 0.999) eps 1e-8, min
  lr 1e-6, no gradient clipping. unilm's training set has one item per image-caption pair, so
  the steps count pairs: 566,747 // 256 = 2213 per epoch -> 22,130 steps, 2,213 warmup. Here too an example is one image-caption pair
  (data.caption_pairs). Validation every epoch: beam-search captions of all 5,000 Karpathy
  validation images, CIDEr-D and BLEU-4 against their references (captioning/* in
  metrics.jsonl), computed in-process (beit3_jax.tasks.metrics, checked against pycocoevalcap)
  on the COCO caption toolkit's PTB tokens of captions and references
  (`metrics.ptb_tokenize`: the toolkit's Java tokenizer when java is installed, else an equal
  Python one).

  Data: the TFDS data set `beit3_coco_karpathy` as for `retrieval` (COCO). Weights: unilm's
  beit3_<size>_patch16_224.pth converted as ckpt/beit3_<size>, the same as for `vqa`; its
  position table is resized to 480 px on load.

  Deviations: drop-worst sorts each loss call's masked tokens (the whole batch, or one
  micro-batch); unilm sorts each GPU's.
  """
  command = CAPTIONING[size]
  config = start('captioning', size, command, 480, normalize_output=True)
  config.label_smoothing = UNILM_DEFAULTS['label_smoothing']
  c = config.captioning
  c.mask_prob = 0.7                     # get_started: --captioning_mask_prob 0.7
  c.drop_worst_after = 12000            # get_started: --drop_worst_after 12000
  c.drop_worst_ratio = 0.2              # --drop_worst_ratio (the script's default)
  c.beam_size = UNILM_DEFAULTS['beam_size']
  c.length_penalty = UNILM_DEFAULTS['length_penalty']
  c.max_len = 30                        # get_started: --num_max_bpe_tokens 32, less bos, mask
  c.eval_examples = 5000                # the whole Karpathy validation split
  vision_language_data(config, 'beit3_coco_karpathy',
                       {'image': 'image_bytes', 'captions': 'captions'}, text_len=32)
  config.data.rand_augment = 'unilm'    # --randaug: RandomAugment(2, 7) of randaug.py
  schedule(config, command, log_every=100)
  return config
