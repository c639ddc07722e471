"""Demo visual tokenizer: a small VQ-KD trained on the built-in data set with the pixel teacher.

Command (from the repository root, after `bash launch/setup_venv.sh`):

    .venv/bin/python -m beit3_jax.main --config=configs/pretrain/tokenizer_demo.py \
        --workdir=workdirs/tokenizer_demo

The demo pretraining (configs/pretrain/demo.py) runs this itself, into
<data dir>/tokenizers/tokenizer_demo, when that directory has no tokenizer yet.

Model: a 2-layer, 128-wide ViT on 64 px images with 8 px patches (an 8 x 8 token grid, the
demo BEiT-3's patch grid), a 256 x 32 codebook, a 1-layer decoder. Teacher: each patch's mean
colour plus a constant (`tokenizer_objective.pixel_teacher` with cells=1), so the codes
partition colour space; codes that fall out of use are restarted (`dead_code_fraction`).
Expect on a 2-core CPU about 2 minutes for 250 steps; measured 2026-11-28: reconstruction loss
(1 - cosine) 0.448 at step 1 -> 0.0019 on the validation split at step 250, validation
codebook usage 95.3% (244 of 256 codes).
"""

from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.defaults import tokenizer_config


def get_config(arg=None):
  del arg
  config = tokenizer_config()
  config.total_steps = 250
  config.checkpoint_every = 250
  config.log_every = 50
  config.eval_every = 250
  config.eval_batches = 8
  config.tokenizer = get_vqkd_config(
      'base', img_size=64, input_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=4,
      mlp_dim=512, n_embed=256, code_dim=32, decoder_embed_dim=128, decoder_depth=1,
      decoder_num_heads=4, decoder_mlp_dim=512, decoder_out_dim=4)
  config.teacher.kind = 'pixel'
  config.teacher.cells = 1
  config.data.image = 'builtin:images'
  config.data.crop_scale = (0.25, 1.0)
  config.data.read_threads = 2
  config.dead_code_fraction = 0.25   # a small tokenizer on small data collapses without it
  config.batch_size = 64
  config.optimizer.lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.warmup_steps = 25
  return config
