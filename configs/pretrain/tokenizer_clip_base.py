"""BEiT v2's base VQ-KD tokenizer with its own teacher, CLIP ViT-B/16, on ImageNet-1k.

The recipe of beit2/TOKENIZER.md (`vqkd_encoder_base_decoder_3x768x12_clip`): a ViT-B/16
encoder, 8192 x 32 codebook (k-means init, EMA decay 0.99), 3-layer decoder regressing the
teacher's 512-d features with a cosine loss; 224 px RandomResizedCrop (scale 0.08-1), batch 512,
AdamW (0.9, 0.99), weight decay 1e-4, 100 epochs (250k steps) with 10 warmup epochs. The teacher
target is what beit2's `get_regress_target` computes: the image rescaled to CLIP's mean/std,
every patch token of CLIP's last block after `ln_post`, projected by `proj` (B, 196, 512).

Convert OpenAI's release (a TorchScript archive; read without running its code, no torch
needed), or transformers' `openai/clip-vit-base-patch16` directory, then train:

    CLIP=https://openaipublic.azureedge.net/clip/models
    curl -LO $CLIP/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt
    python -m beit3_jax.tokenizers.clip_convert ViT-B-16.pt gs://BUCKET/teachers/clip_vit_b16
    bash launch/tpu_pod.sh run beit3_jax.main --config=configs/pretrain/tokenizer_clip_base.py \
        --workdir=gs://BUCKET/runs/vqkd_clip_base --config.data.data_dir=gs://BUCKET/data \
        --config.teacher.path=gs://BUCKET/teachers/clip_vit_b16

(ImageNet as TFDS array_record under data_dir, as configs/pretrain/tokenizer_base.py builds it.)
Plan it without weights (the planner builds the teacher that teacher.variant names):
    python -m beit3_jax.plan --config=configs/pretrain/tokenizer_clip_base.py
Expect from the plan (docs/performance.md): fits v5p-8, 20.6 of 95 GiB per chip at the peak,
compile about 100 s, roofline bound 90 ms per step.

The trained tokenizer is exported to <workdir>/tokenizer, for a pretraining config's
`tokenizer.path`. Expect (BEiT v2 reports for this tokenizer) codebook usage near 97%.
Not run by us (no TPU available).
"""

from beit3_jax.defaults import tokenizer_config
from beit3_jax.tokenizers import get_vqkd_config


def get_config(arg=None):
  del arg
  config = tokenizer_config()
  config.tokenizer = get_vqkd_config('vqkd_encoder_base_decoder_3x768x12_clip',
                                     decoder_out_dim=512)   # CLIP ViT-B/16's projection
  config.teacher.kind = 'clip'
  config.teacher.variant = 'vit_b16'   # for the planner; the run reads teacher.path
  # beit2's run_vqkd_training scales lr by the global batch / 128: 5e-5 * 512 / 128.
  config.optimizer.lr = 2e-4
  config.tpu_slice = 'v5p-8'
  config.data.workers = 32   # worker processes on the host
  config.data.read_threads = 0
  return config
