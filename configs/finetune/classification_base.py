"""BEiT-3 base fine-tuning on ImageNet-1k classification, unilm's recipe, 224 px.

Recipe (unilm beit3/get_started/get_started_for_image_classification.md, the base command):
batch 1024 (8 GPUs x 128), lr 7e-4, layer decay 0.65, 50 epochs with 5 warmup epochs, drop
path 0.15, weight decay 0.05, mixup 0.8 / cutmix 1.0. Defaults of unilm
beit3/run_beit3_finetuning.py for the rest: label smoothing 0.1, mixup_prob 1.0,
mixup_switch_prob 0.5, AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no gradient clipping; the
model `beit3_base_patch16_224_imageclassification` has no final backbone norm
(normalize_output=False, beit3_reference.md §5). Epochs -> steps as unilm's
`cosine_scheduler`: steps per epoch = 1,281,167 ImageNet-1k train images // 1024 = 1251, so
50 epochs = 62,550 steps and 5 warmup epochs = 6,255 steps. Validation every epoch on 48
batches (49,152 of the 50,000 validation images; batches are whole).

Prepare the data once (nothing is downloaded; the official files, layout in
beit3_jax/data/builders/imagenet.py) as the TFDS data set `beit3_imagenet2012` (features
`image`, `label`; splits train / validation):
    python -c "from beit3_jax.data.builders import imagenet; \
        imagenet.prepare(manual_dir='/data/imagenet')"
and convert unilm's pretrained weights (downloaded by you; see README "Weights from and to
PyTorch"):
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base

Command:
    python -m beit3_jax.main --config=configs/finetune/classification_base.py \
        --workdir=workdirs/imagenet_base --config.init_from=ckpt/beit3_base
`init_from` may also be a pretraining workdir of ours (configs/pretrain/base.py): its
backbone is taken, the head starts fresh. Add --config.data.data_dir=DIR if the data was
prepared outside the default data dir. To score the whole validation set afterwards:
    ... --config.mode=eval --config.batch_size=1000 --config.eval_batches=50

Expect (beit3_reference.md §6; unilm README and get_started_for_image_classification.md):
top-1 85.4 (unilm's fine-tuned base: Acc@1 85.400, Acc@5 97.630) on the validation set.
This repository has not run it.

Deviations from unilm: the training view is RandomResizedCrop (scale 0.08-1, bicubic) + flip
only: no RandAugment (rand-m9-mstd0.5-inc1), colour jitter or random erasing (reprob 0.25),
which timm's `create_transform` adds there; the validation view is a plain 224 x 224 resize,
not resize-shorter-side + centre crop; the warmup starts at 0, not at warmup_lr 1e-6;
bfloat16 compute instead of DeepSpeed fp16. unilm's recipe uses no EMA (model_ema off).
"""

from beit3_jax.data import image_ops
from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config

TRAIN_EXAMPLES = 1_281_167              # ImageNet-1k train (beit3_imagenet2012 'train')
BATCH_SIZE = 1024                       # get_started: 8 GPUs x --batch_size 128
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE   # 1251, as unilm (len // batch)
EPOCHS, WARMUP_EPOCHS = 50, 5           # get_started: --epochs 50 --warmup_epochs 5


def get_config(arg=None):
  del arg
  config = finetune_config('classification')
  # beit3_base_patch16_224_imageclassification: no final norm; --drop_path 0.15.
  config.model = model_config('base', img_size=224, drop_path_rate=0.15,
                              normalize_output=False, vocab_size=64010, dtype='bfloat16')
  config.init_from = ''                 # pass --config.init_from (see the docstring)
  config.num_classes = 1000
  config.label_smoothing = 0.1          # run_beit3_finetuning.py --smoothing default
  config.mixup = 0.8                    # get_started: --mixup 0.8
  config.cutmix = 1.0                   # get_started: --cutmix 1.0
  config.mixup_prob = 1.0               # run_beit3_finetuning.py defaults
  config.mixup_switch_prob = 0.5

  d = config.data
  d.source = 'beit3_imagenet2012'       # beit3_jax/data/builders/imagenet.py
  d.fields.update({'image': 'image', 'label': 'label'})
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.spm_path = ''                       # no text in this task
  d.crop_scale = (0.08, 1.0)            # timm create_transform's RandomResizedCrop
  d.flip_prob = 0.5
  d.image_mean = image_ops.IMAGENET_MEAN   # datasets.py: IMAGENET_DEFAULT_MEAN / STD
  d.image_std = image_ops.IMAGENET_STD
  d.read_threads = 16

  config.batch_size = BATCH_SIZE
  o = config.optimizer
  o.lr = 7e-4                           # get_started: --lr 7e-4
  o.min_lr = 1e-6                       # run_beit3_finetuning.py --min_lr default
  o.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH   # 6,255
  o.weight_decay = 0.05                 # get_started: --weight_decay 0.05
  o.layer_decay = 0.65                  # get_started: --layer_decay 0.65
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # run_beit3_finetuning.py --opt_betas / --opt_eps
  o.clip_norm = 0.0                     # --clip_grad None

  config.total_steps = EPOCHS * STEPS_PER_EPOCH      # 62,550
  config.eval_every = STEPS_PER_EPOCH   # unilm evaluates every epoch
  config.eval_batches = 48              # 49,152 of the 50,000 validation images
  config.checkpoint_every = STEPS_PER_EPOCH
  config.log_every = 100
  return config
