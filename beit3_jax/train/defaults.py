"""Every field of a training config, with its default (the configs in configs/ override them).

`pretrain_config()` and `tokenizer_config()` return unlocked ConfigDicts; a config file sets
what differs and returns it. Fields shared by every training job:

  seed               parameters, data order and augmentation all follow from it.
  total_steps        optimizer updates of the run (also the length of the lr schedule).
  checkpoint_every   steps between async checkpoints (one is always written at the end).
  keep_checkpoints   newest checkpoints kept.
  log_every          steps between lines of metrics.jsonl (averaged over those steps).
  eval_every         steps between validation passes (0 = never; the last step always).
  eval_batches       validation batches per pass (the same batches every time).
  mesh_shape         (data, fsdp, tensor) device counts; -1 = the rest of the devices.
  micro_batches      gradient accumulation: the global batch is cut into this many slices.
  init_from          '' or a workdir / step dir / params dir (see train/checkpoints.py).
  peak_tflops_per_device  for MFU where the device kind is not in train/flops.py (e.g. CPUs).
  stop_at_step       > 0: checkpoint and stop after this step (a planned interruption).
"""

from __future__ import annotations

import ml_collections


def loop_fields(config: ml_collections.ConfigDict) -> None:
  config.seed = 0
  config.total_steps = 1000
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.log_every = 50
  config.eval_every = 500
  config.eval_batches = 4
  config.mesh_shape = (-1, 1, 1)
  config.micro_batches = 1
  config.init_from = ''
  config.peak_tflops_per_device = 0.0
  config.stop_at_step = 0


def pretrain_config() -> ml_collections.ConfigDict:
  """BEiT-3 masked data modeling: the paper's recipe (arXiv 2208.10442, Table 11) at base size.

  Model: `beit3_jax.models.get_config('base', drop_path_rate=0.1)`. The optimizer fields are
  the paper's: AdamW b1 0.9, b2 0.98, eps 1e-6, peak lr 1e-3 after a 10k-step linear warmup,
  cosine decay, weight decay 0.05, clipping 3.0. Batch: 2048 images + 2048 texts + 2048 pairs.
  Masking: 40% of image patches (block-wise), 15% of text tokens, 50% of caption tokens.
  """
  from beit3_jax.models import get_config
  config = ml_collections.ConfigDict()
  config.job = 'pretrain'
  loop_fields(config)
  config.total_steps = 1_000_000
  config.checkpoint_every = 5000
  config.log_every = 100
  config.eval_every = 5000
  config.model = get_config('base', drop_path_rate=0.1)

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.path = ''          # VQ-KD params directory (convert CLI to-flax --model vqkd)
  config.tokenizer.train_config = ''  # or a tokenizer config trained into <data_dir>/tokenizers

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''           # '' = $BEIT3_JAX_DATA_DIR or ~/.cache/beit3_jax
  config.data.builtin_image_size = 64
  config.data.image = 'imagenet2012'  # TFDS names, or builtin:images / builtin:text
  config.data.text = ''
  config.data.pair = 'coco_captions'
  config.data.fields = ml_collections.ConfigDict({'image': {}, 'text': {},
                                                  'pair': {'caption': 'captions/text'}})
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.spm_path = ''           # beit3.spm for the released vocabulary
  config.data.text_len = 64
  config.data.image_mask_ratio = 0.4
  config.data.min_mask_block = 16
  config.data.pair_image_mask_ratio = 0.0   # the paper does not say pair images are masked
  config.data.text_mask_ratio = 0.15
  config.data.pair_text_mask_ratio = 0.5
  config.data.crop_scale = (0.08, 1.0)
  config.data.color_jitter = 0.4
  config.data.read_threads = 16

  config.batch_size = ml_collections.ConfigDict({'image': 2048, 'text': 2048, 'pair': 2048})
  config.loss_weights = ml_collections.ConfigDict(
      {'image': 1.0, 'text': 1.0, 'pair': 1.0, 'pair_image': 1.0})
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-3, min_lr=1e-5, warmup_steps=10_000, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05,
      clip_norm=3.0, layer_decay=1.0))
  return config


def tokenizer_config() -> ml_collections.ConfigDict:
  """VQ-KD tokenizer training, BEiT v2's recipe (beit2/TOKENIZER.md): ImageNet-1k, batch 512,
  AdamW b1 0.9 b2 0.99 weight decay 1e-4, 10 warmup epochs of 100 (lr 5e-5 per 256 scaled
  to 1e-4 here), min crop scale 0.08, codebook 8192 x 32 with EMA decay 0.99."""
  from beit3_jax.tokenizers import get_vqkd_config
  config = ml_collections.ConfigDict()
  config.job = 'tokenizer'
  loop_fields(config)
  config.total_steps = 250_000
  config.checkpoint_every = 5000
  config.log_every = 100
  config.eval_every = 5000
  config.tokenizer = get_vqkd_config('base')
  config.teacher = ml_collections.ConfigDict({'kind': 'vit', 'path': '', 'cells': 2})
  config.data = ml_collections.ConfigDict(dict(
      data_dir='', builtin_image_size=64, image='imagenet2012', image_field='image',
      train_split='train', eval_split='validation', crop_scale=(0.08, 1.0), read_threads=16))
  config.batch_size = 512
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, min_lr=1e-5, warmup_steps=25_000, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4,
      clip_norm=0.0, layer_decay=1.0))
  config.dead_code_fraction = 0.0   # > 0: restart codes used less than this share of the mean
  config.output = ''   # where the trained tokenizer is exported ('' = <workdir>/tokenizer)
  return config
