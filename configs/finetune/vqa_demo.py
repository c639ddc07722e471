"""Demo fine-tuning: VQA on the built-in data from the demo pretraining.

Answers the built-in questions (colours, shapes, sizes, counts, yes/no; 18 answers,
`synthetic_world.ANSWERS`) with `VQAModel`, starting from the backbone of the demo pretraining
run (configs/pretrain/demo.py, workdir workdirs/demo; the VQA pooler and head start fresh).
Each image has 4 questions; each time an image is drawn one of them is picked at random.

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/vqa_demo.py \
        --workdir=workdirs/finetune_vqa_demo

Add `--config.init_from=''` to train the same model from a random initialisation instead.
150 steps of 32 image-question pairs (64 px, 24-token questions), validation VQA accuracy every
50 steps on the validation split (7 batches) against the most-frequent-answer baseline
(val vqa/baseline_accuracy in metrics.jsonl).

Status (issue 6, work in progress), measured 2026-11-28 on 2 cores: these steps do NOT yet beat
the baseline: the model learns to always answer the most frequent answer (validation accuracy
0.281 = the most-frequent-answer baseline, from the demo checkpoint and from random init).
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config


def get_config(arg=None):
  del arg
  config = finetune_config('vqa')
  config.init_from = 'workdirs/demo'
  config.total_steps = 150
  config.checkpoint_every = 150
  config.log_every = 10
  config.eval_every = 50
  config.eval_batches = 7
  # The demo pretraining's model, without the final norm (as unilm's VQA models).
  config.model = model_config('small', embed_dim=128, depth=4, num_heads=4, mlp_dim=512,
                              img_size=64, patch_size=8, vocab_size=128, max_text_positions=34,
                              drop_path_rate=0.0, normalize_output=False)
  config.data.source = 'builtin:images'
  config.data.text_len = 24
  config.data.crop_scale = (0.5, 1.0)
  config.data.read_threads = 2
  config.batch_size = 32
  config.optimizer.lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.warmup_steps = 15
  config.optimizer.layer_decay = 0.75
  return config
