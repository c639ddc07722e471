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
RESULTS
"""

from beit3_jax.train.finetune import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('vqa')
  return config
