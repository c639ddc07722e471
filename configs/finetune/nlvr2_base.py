r"""BEiT-3 base fine-tuning on NLVR2 (visual reasoning over image pairs), unilm's recipe, 224 px.

unilm's base command (get_started_for_nlvr2.md): lr 7e-4 (5e-4 for base-indomain), layer decay
0.65; with both sizes' batch 256, 20 epochs (6,740 steps), drop path 0.2, weight decay 0.2.
The recipe's sources, the steps, the data and the deviations: `nlvr2` and `NLVR2` in
beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_nlvr2` as `nlvr2` says, convert unilm's pretrained weights
(downloaded by you) and get unilm's `beit3.spm`:
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base

Command (init_from may also be a pretraining workdir of ours, configs/pretrain/base.py):
    python -m beit3_jax.main --config=configs/finetune/nlvr2_base.py \
        --workdir=workdirs/nlvr2_base --config.init_from=ckpt/beit3_base \
        --config.data.spm_path=/path/to/beit3.spm
Score test-P afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, no remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/nlvr2_base.py
Expect from the plan (docs/performance.md): fits, 60.9 of 95 GiB per chip at the peak, compile
about 45 s on a 2-core host, roofline bound 93 ms per step (MFU <= 42%).

Expect (the results table of unilm's beit3/README.md, github.com/microsoft/unilm): dev 83.6
/ test-P 84.4 accuracy (unilm's fine-tuned base: test Acc 84.386 in get_started_for_nlvr2.md).
This repository has not run it.

Deviations from unilm: only those of every recipe here (the warmup peaks one step later, bfloat16
compute; see the module).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  del arg
  return recipes.nlvr2('base')
