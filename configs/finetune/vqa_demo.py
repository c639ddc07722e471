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

Measured 2026-11-29 on 2 cores (about 5 minutes): validation accuracy 0.344 against 0.281 for
the most frequent answer ("no") after 600 steps; at lr 3e-4, 0.348. That is +6.3 points; issue
6 asks for +20, so this demo does not meet its target yet: the model has not learned to match
the words of a question with what is in the image (see the README's Fine-tuning section). From
a random initialisation the same 600 steps reach 0.317. (With the earlier demo backbone,
pretrained with N(0, 1) position tables: 0.388, and 0.397 after 1200 steps.)
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
