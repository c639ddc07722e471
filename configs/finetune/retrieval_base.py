r"""BEiT-3 base fine-tuning for image-text retrieval on COCO (default) or Flickr30k, 384 px.

unilm's base commands (get_started_for_retrieval.md): layer decay 0.65; COCO lr 2e-4, 15 epochs
(2,760 steps); Flickr30k lr 1e-4, 20 epochs (940 steps); with both sizes' batch 3072, drop path
0.2, weight decay 0.05, activation checkpointing (here model.remat), from the ITC-tuned
weights. The recipe's sources, the steps, the data and the deviations: `retrieval` and
`RETRIEVAL` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_coco_karpathy` (or `beit3_flickr30k_karpathy`) as `retrieval`
says and convert unilm's beit3_base_itc_patch16_224.pth with its retrieval heads to
ckpt/beit3_base_itc (its position table is resized to 384 px on load):
    python -m beit3_jax.convert to-flax beit3_base_itc_patch16_224.pth ckpt/beit3_base_itc \
        --variant base --task retrieval
Get unilm's `beit3.spm` too.

Command (COCO; append `:flickr30k` to the config path for Flickr30k):
    python -m beit3_jax.main --config=configs/finetune/retrieval_base.py \
        --workdir=workdirs/coco_retrieval_base --config.init_from=ckpt/beit3_base_itc \
        --config.data.spm_path=/path/to/beit3.spm
Score the Karpathy test split (5k COCO / 1k Flickr30k images) afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, full remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/retrieval_base.py
Expect from the plan (docs/performance.md): fits, 79.6 of 95 GiB per chip at the peak, compile
about 65 s on a 2-core host, roofline bound 1823 ms per step (MFU <= 34%).

Expect (unilm's beit3/README.md, github.com/microsoft/unilm, retrieval @384 from -itc): COCO
5k test IR@1 61.4 / TR@1 79.1 (retrieval/t2i_r1 / retrieval/i2t_r1); Flickr30k 1k test
IR@1 86.2 / TR@1 96.3. This repository has not run it.

Deviations from unilm: only those of every recipe here (the warmup peaks one step later,
bfloat16 compute; see `retrieval`).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  return recipes.retrieval('base', arg)
