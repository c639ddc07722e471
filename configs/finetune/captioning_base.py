r"""BEiT-3 base fine-tuning for COCO captioning (Karpathy splits), unilm's recipe, 480 px.

unilm's base command (get_started_for_captioning.md): lr 4e-5; with both sizes' batch 256, 10
epochs (22,130 steps), drop path 0.1, mask prob 0.7, 32 text tokens, activation checkpointing
(here model.remat). The recipe's sources, the steps, the data and the deviations:
`captioning` and `CAPTIONING` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_coco_karpathy` as `retrieval` says and convert unilm's
beit3_base_patch16_224.pth to ckpt/beit3_base as for configs/finetune/vqa_base.py (its
position table is resized to 480 px on load). Get unilm's `beit3.spm` too.

Command:
    python -m beit3_jax.main --config=configs/finetune/captioning_base.py \
        --workdir=workdirs/coco_captioning_base --config.init_from=ckpt/beit3_base \
        --config.data.spm_path=/path/to/beit3.spm
Score the Karpathy test split afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, full remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/captioning_base.py
Expect from the plan (docs/performance.md): fits, 14.4 of 95 GiB per chip at the peak, compile
about 45 s on a 2-core host, roofline bound 235 ms per step (MFU <= 34%).

Expect (the results table of unilm's beit3/README.md, github.com/microsoft/unilm): COCO
Karpathy test CIDEr 133.6 (no CIDEr optimisation; our in-process CIDEr-D tokenises the
references close to but not as the COCO toolkit's PTB tokeniser, see `captioning`). This
repository has not run it.

Deviations from unilm: the warmup peaks one step later; bfloat16 compute; drop-worst sorts
each micro-batch's tokens, not each GPU's (`captioning` has the details).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  del arg
  return recipes.captioning('base')
