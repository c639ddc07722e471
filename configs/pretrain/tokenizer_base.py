"""A VQ-KD base tokenizer (8192 x 32 codes, ViT-B/16 encoder) distilled from a frozen teacher on
ImageNet, BEiT v2's recipe (beit2/TOKENIZER.md) with the teacher swapped: BEiT v2 used CLIP
ViT-B/16 (that recipe is configs/pretrain/tokenizer_clip_base.py); here the teacher is a frozen
BEiT-3 (e.g. the released base, converted with the convert CLI) or a ViT encoder of a converted
VQ-KD.

    tfds build imagenet2012 --data_dir=gs://BUCKET/data/tfds --file_format=array_record \
        --manual_dir=...
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth gs://BUCKET/beit3_base \
        --variant base
    bash launch/tpu_pod.sh run beit3_jax.main --config=configs/pretrain/tokenizer_base.py \
        --workdir=gs://BUCKET/runs/vqkd_base --config.data.data_dir=gs://BUCKET/data \
        --config.teacher.path=gs://BUCKET/beit3_base

Made for a v5p-8 slice (4 chips): data parallel, batch 512. Plan it (no TPU and no teacher
weights needed: the planner builds the teacher that teacher.variant names, here base):
    python -m beit3_jax.plan --config=configs/pretrain/tokenizer_base.py
Expect from the plan (docs/performance.md): fits, 21.2 of 95 GiB per chip at the peak, compile
about 110 s on a 2-core host, roofline bound 90 ms per step (MFU <= 52%).

The trained tokenizer is exported to <workdir>/tokenizer, for a pretraining config's
`tokenizer.path`. Expect (BEiT v2 reports for its CLIP teacher) codebook usage near 100%.
Not run by us (no TPU available).
"""

from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.defaults import tokenizer_config


def get_config(arg=None):
  del arg
  config = tokenizer_config()
  config.tokenizer = get_vqkd_config('base', decoder_out_dim=768)  # the teacher's width
  config.teacher.kind = 'beit3'
  config.teacher.variant = 'base'   # for the planner; the run reads teacher.path
  config.tpu_slice = 'v5p-8'
  config.data.workers = 32   # worker processes on the host
  config.data.read_threads = 0
  return config
