"""Demo fine-tuning: VQA on the built-in data, from the demo pretraining.

Answers the built-in questions (colours, shapes, sizes, counts, yes/no: 18 answers,
`synthetic_world.ANSWERS`) with `VQAModel` (pooled vision CLS -> head, BCE x answers),
starting from the backbone of the demo pretraining run (configs/pretrain/demo.py in
workdirs/demo; the pooler and head start fresh). Each image has 4 questions; each time an
image is drawn one of them is picked at random (validation: a fixed pick per image).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/vqa_demo.py \
        --workdir=workdirs/finetune_vqa_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-11-28 on 2 cores (about 6 minutes): validation accuracy 0.388 against 0.281 for
the most frequent answer ("no") after 600 steps (0.313 after 300; a 1200-step run plateaus at
0.402 / 0.397, the level the question types alone give). That is +10.7 points; issue
6 asks for +20, so this demo does not meet its target yet (the demo backbone does not use the
image in its own pair MLM: pair accuracy 38.4% = text-only 39.2%, so grounding is learned here
from scratch). From a random initialisation the same 600 steps reach 0.304.
"""

from beit3_jax.train.finetune import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('vqa')
  config.total_steps = 600
  config.checkpoint_every = 600
  config.eval_every = 300
  config.optimizer.task_head_lr_weight = 10.0   # unilm's VQA recipe: 20
  return config
