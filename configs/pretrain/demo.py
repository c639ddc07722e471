"""Demo pretraining: a small BEiT-3 on the built-in data set, on a CPU, in minutes.

Command (the README's main command; from the repository root):

    bash launch/setup_venv.sh && .venv/bin/python -m beit3_jax.main \
        --config=configs/pretrain/demo.py --workdir=workdirs/demo

On a fresh machine it first builds the built-in data set and its .spm (about 35 s), then trains
the demo visual tokenizer (configs/pretrain/tokenizer_demo.py) into
<data dir>/tokenizers/tokenizer_demo, then pretrains: images (MIM), texts (MLM) and image-text
pairs (MLM on the 50%-masked caption), 32 of each per step. Model: 4 layers, width 128, 4
heads, 64 px images with 8 px patches, 24-token texts. The run ends by printing where the
checkpoints and metrics went. Rerunning the same command resumes from the newest checkpoint.

Expect on a 2-core CPU: see the README's demo table for the measured total time, the loss
drop and the validation accuracies against their most-frequent-target baselines.
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.defaults import pretrain_config


def get_config(arg=None):
  del arg
  config = pretrain_config()
  config.total_steps = 600
  config.checkpoint_every = 200
  config.log_every = 20
  config.eval_every = 300
  config.eval_batches = 4
  config.model = model_config('small', embed_dim=128, depth=4, num_heads=4, mlp_dim=512,
                              img_size=64, patch_size=8, vocab_size=128, max_text_positions=34,
                              drop_path_rate=0.0)
  config.tokenizer.train_config = 'configs/pretrain/tokenizer_demo.py'
  config.data.image = 'builtin:images'
  config.data.text = 'builtin:text'
  config.data.pair = 'builtin:images'
  config.data.fields = {'image': {}, 'text': {}, 'pair': {}}
  config.data.text_len = 24
  config.data.min_mask_block = 4
  config.data.crop_scale = (0.5, 1.0)
  config.data.color_jitter = 0.0
  config.data.read_threads = 2
  config.batch_size.image = 32
  config.batch_size.text = 32
  config.batch_size.pair = 32
  config.optimizer.lr = 1e-3
  config.optimizer.warmup_steps = 50
  return config
