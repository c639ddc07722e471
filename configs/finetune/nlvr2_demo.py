"""Demo fine-tuning: NLVR2 on the built-in data's pairs of images, from the demo pretraining.

Decides whether a statement about a pair of images ("there are at least four objects in
total", "both images have at least two objects", "the left image has more objects than the
right image": `synthetic_world.NLVR2_KINDS`) is true, with `NLVR2Classifier`, starting from the
backbone of the demo pretraining run (configs/pretrain/demo.py in workdirs/demo; the head
starts fresh). Every statement is true of half of its pairs, so the text alone predicts
nothing, and the labels alternate, so the validation majority class scores about 50%.

As in the VQA demo, the images are fine-tuned at 32 px (`init_from` resizes the vision position
table) and the backbone trains at lr 1e-4 with the head at 10x: at lr 1e-3 this demo stays at
chance (0.491 after 1000 steps).

unilm's RandAugment / RandomAugment and random erasing (data.rand_augment,
data.random_erasing) are off: the demo keeps the view its figures below were measured with
(they were not tried at the demo's 32-64 px; the ops were made for 224-480 px photographs).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/nlvr2_demo.py \
        --workdir=workdirs/finetune_nlvr2_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-12-07 on 2 cores (1000 steps, about 5 minutes; data version 1.3.0), on the
whole validation split (250 pairs):
`Finished: loss 0.5307; val nlvr2/accuracy 0.7480; val nlvr2/baseline_accuracy 0.5000`
(0.496 / 0.592 / 0.700 / 0.748 at steps 250-1000): +24.8 points. From a random
initialisation: 0.500, at chance (`Finished: loss 0.6932; val nlvr2/accuracy 0.5000`).
(Before, on the first 224 pairs with the truncated-normal demo backbone: 0.795, random 0.487.)
Statements that name objects (`synthetic_world.NLVR2_MATCHING_KINDS`, the built-in data up to
version 1.2.0) stay at chance here: see the README's Fine-tuning section.
"""

from beit3_jax.tasks.recipes import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('nlvr2')
  config.data.rand_augment = ''   # off: see the docstring
  config.data.random_erasing = 0.0
  config.model.img_size = 32
  config.total_steps = 1000
  config.checkpoint_every = 250
  config.eval_every = 250
  config.log_every = 50
  config.optimizer.lr = 1e-4
  config.optimizer.task_head_lr_weight = 10.0
  return config
