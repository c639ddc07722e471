"""Demo fine-tuning: image-text retrieval on the built-in captions, from the demo pretraining.

Trains `RetrievalModel` (image-only and text-only passes, contrastive loss over the batch)
starting from the backbone of the demo pretraining run (configs/pretrain/demo.py in
workdirs/demo; `vision_head`, `language_head` and `logit_scale` start fresh). Validation ranks
the first 224 validation images against all of their captions (5 each): R@1/5/10 both ways
(val retrieval/* in metrics.jsonl), against a random ranking's R@1 (retrieval/random_r1).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/retrieval_demo.py \
        --workdir=workdirs/finetune_retrieval_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-11-28 on 2 cores: this demo does NOT learn yet. The text features collapse to
one direction within about 50 steps (mean pairwise cosine 0.99) and the loss settles at
ln 32, the chance level of a batch of 32: R@1 0.4-0.6% against 0.45% for a random ranking,
with lr 1e-3, 5e-4 (layer decay 0.65, warmup 60), 3e-4 (clipping 1.0) and, outside the
trainer, 1e-4 and 2e-5. Open work for issue 6.
"""

from beit3_jax.train.finetune import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('retrieval')
  return config
