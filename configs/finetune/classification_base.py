r"""BEiT-3 base fine-tuning on ImageNet-1k classification, unilm's recipe, 224 px.

unilm's base command (get_started_for_image_classification.md): lr 7e-4, layer decay 0.65,
drop path 0.15; with both sizes' batch 1024, 50 epochs (62,550 steps), mixup 0.8 / cutmix 1.0.
The recipe's sources, the steps, the data and the deviations: `classification` and
`CLASSIFICATION` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_imagenet2012` as `classification` says and convert unilm's
pretrained weights (downloaded by you):
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base

Command (init_from may also be a pretraining workdir of ours, configs/pretrain/base.py):
    python -m beit3_jax.main --config=configs/finetune/classification_base.py \
        --workdir=workdirs/imagenet_base --config.init_from=ckpt/beit3_base
To score the whole validation set again afterwards (every validation scores all of it):
    ... --config.mode=eval

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, no remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/classification_base.py
Expect from the plan (docs/performance.md): fits, 84.3 of 95 GiB per chip at the peak, compile
25-45 s on a 2-core host, roofline bound 95 ms per step (MFU <= 62%).

Expect (unilm's beit3/README.md and get_started/get_started_for_image_classification.md,
github.com/microsoft/unilm): top-1 85.4 (unilm's fine-tuned base: Acc@1 85.400, Acc@5 97.630) on
the validation set. This repository has not run it.

Validation view as unilm's: the shorter side to 224, then the centre crop (data.eval_crop_pct).
Deviations from unilm: the warmup peaks one step later; bfloat16 compute (`classification` has
the details: its training view is unilm's, RandAugment rand-m9-mstd0.5-inc1 and random erasing
included).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  del arg
  return recipes.classification('base')
