"""Demo fine-tuning: VQA on the built-in data, from the demo pretraining.

Answers the built-in questions (colours, shapes, sizes, counts, yes/no: 18 answers,
`synthetic_world.ANSWERS`) with `VQAModel` (pooled vision CLS -> head, BCE x answers),
starting from the backbone of the demo pretraining run (configs/pretrain/demo.py in
workdirs/demo; the pooler and head start fresh). Each image has 4 questions; each time an
image is drawn one of them is picked at random (validation: a fixed pick per image).

The images are fine-tuned at 32 px (4 x 4 patches of 8 px) instead of the pretraining's 64 px:
`init_from` resizes the vision position table (bicubic, as unilm), and a step takes a third of
the time, so the run can take the 3000 steps this task needs.

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/vqa_demo.py \
        --workdir=workdirs/finetune_vqa_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-11-29 on 2 cores (3000 steps, about 11 minutes): validation accuracy 0.424
against 0.281 for the most frequent answer ("no"): +14.3 points. Issue 6 asks for +20, so this
demo does not meet its target yet. The model learns the question types slowly (one answer per
type until about step 2000) and starts to use the image only for colour questions (see the
README's Fine-tuning section). From a random initialisation the same run reaches 0.393.
Earlier settings: 600 steps at 64 px, 0.344 (random init 0.317); 6000 steps at 32 px, 0.433.
"""

from beit3_jax.train.finetune import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('vqa')
  config.model.img_size = 32
  config.total_steps = 3000
  config.checkpoint_every = 500
  config.eval_every = 500
  config.log_every = 100
  config.optimizer.task_head_lr_weight = 10.0   # unilm's VQA recipe: 20
  return config
