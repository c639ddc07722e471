r"""BEiT-3 large fine-tuning on ImageNet-1k classification, unilm's recipe, 224 px.

unilm's large command (get_started_for_image_classification.md): lr 2e-4, layer decay 0.8,
drop path 0.25, activation checkpointing (here model.remat); with both sizes' batch 1024, 50
epochs (62,550 steps), mixup 0.8 / cutmix 1.0. The recipe's sources, the steps, the data and
the deviations: `classification` and `CLASSIFICATION` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_imagenet2012` as `classification` says and convert unilm's
pretrained weights (downloaded by you):
    python -m beit3_jax.convert to-flax beit3_large_patch16_224.pth ckpt/beit3_large \
        --variant large

Command (init_from may also be a pretraining workdir of ours, configs/pretrain/large.py):
    python -m beit3_jax.main --config=configs/finetune/classification_large.py \
        --workdir=workdirs/imagenet_large --config.init_from=ckpt/beit3_large
To score the whole validation set again afterwards (every validation scores all of it):
    ... --config.mode=eval

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, full remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/classification_large.py
Expect from the plan (docs/performance.md): fits, 19.7 of 95 GiB per chip at the peak, compile
40-52 s on a 2-core host, roofline bound 319 ms per step (MFU <= 65%).

Expect (unilm's beit3/README.md and get_started/get_started_for_image_classification.md,
github.com/microsoft/unilm): top-1 87.6 (unilm's fine-tuned large: Acc@1 87.580, Acc@5 98.326)
on the validation set. This repository has not run it.

Validation view as unilm's: the shorter side to 224, then the centre crop (data.eval_crop_pct).
Deviations from unilm: the warmup peaks one step later; bfloat16 compute (`classification` has
the details: its training view is unilm's, RandAugment rand-m9-mstd0.5-inc1 and random erasing
included).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  del arg
  return recipes.classification('large')
