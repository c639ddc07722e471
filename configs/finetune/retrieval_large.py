r"""BEiT-3 large fine-tuning for image-text retrieval on COCO (default) or Flickr30k, 384 px.

unilm's large command (get_started_for_retrieval.md): lr 5e-5, layer decay 0.85 (the doc gives
the Flickr30k lr 1e-4 for base only; large keeps 5e-5); COCO 15 epochs (2,760 steps),
Flickr30k 20 epochs (940 steps); with both sizes' batch 3072 (large: 2 nodes x 16 GPUs x 96),
drop path 0.2, weight decay 0.05, activation checkpointing (here model.remat), from the
ITC-tuned weights. The recipe's sources, the steps, the data and the deviations: `retrieval`
and `RETRIEVAL` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_coco_karpathy` (or `beit3_flickr30k_karpathy`) as `retrieval`
says and convert unilm's beit3_large_itc_patch16_224.pth with its retrieval heads to
ckpt/beit3_large_itc (its position table is resized to 384 px on load):
    python -m beit3_jax.convert to-flax beit3_large_itc_patch16_224.pth ckpt/beit3_large_itc \
        --variant large --task retrieval
Get unilm's `beit3.spm` too.

Command (COCO; append `:flickr30k` to the config path for Flickr30k):
    python -m beit3_jax.main --config=configs/finetune/retrieval_large.py \
        --workdir=workdirs/coco_retrieval_large --config.init_from=ckpt/beit3_large_itc \
        --config.data.spm_path=/path/to/beit3.spm
Score the Karpathy test split (5k COCO / 1k Flickr30k images) afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Made for a v5p-16 slice (8 chips): data parallel, scanned layers, full remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/retrieval_large.py
Expect from the plan (docs/performance.md): fits, 62.9 of 95 GiB per chip at the peak, compile
about 77 s on a 2-core host, roofline bound 2425 ms per step (MFU <= 44%).

Expect (unilm's beit3/README.md, github.com/microsoft/unilm, retrieval @384 from -itc): COCO
5k test IR@1 63.4 / TR@1 82.1 (retrieval/t2i_r1 / retrieval/i2t_r1); Flickr30k 1k test
IR@1 88.1 / TR@1 97.2. This repository has not run it.

Deviations from unilm: only those of every recipe here (the warmup peaks one step later,
bfloat16 compute; see `retrieval`).
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  return recipes.retrieval('large', arg)
