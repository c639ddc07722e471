"""Demo fine-tuning: image classification of the built-in data, from the demo pretraining.

Classifies each built-in image by the colour of its largest object (6 classes,
`synthetic_world.LABEL_NAMES`) with `ImageClassifier` (mean of the patch tokens -> fc_norm ->
head), starting from the backbone of the demo pretraining run (configs/pretrain/demo.py in
workdirs/demo; its MIM/MLM heads are dropped, the classification head starts fresh).

unilm's RandAugment / RandomAugment and random erasing (data.rand_augment,
data.random_erasing) are off: the demo keeps the view its figures below were measured with
(they were not tried at the demo's 32-64 px; the ops were made for 224-480 px photographs).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/classification_demo.py \
        --workdir=workdirs/finetune_classification_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-12-07 on 2 cores (300 steps of 32, about 3 minutes), on the whole validation
split (500 images): accuracy 0.862 (0.708 after 150 steps) against 0.190 for the majority
class: +67 points. From a random initialisation the same 300 steps reach 0.504. (Before, on
the first 224 validation images and a demo backbone pretrained with the truncated-normal init:
0.835, random init 0.420; with N(0, 1) position tables: 0.469.)
"""

from beit3_jax.data import synthetic_world
from beit3_jax.tasks.recipes import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('classification')
  config.data.rand_augment = ''   # off: see the docstring
  config.data.random_erasing = 0.0
  config.num_classes = len(synthetic_world.LABEL_NAMES)
  config.class_names = tuple(synthetic_world.LABEL_NAMES)
  # In 300 steps the plain view did better than augmenting (0.469 vs 0.397 validation
  # accuracy with crop scale 0.8-1, flips and label smoothing 0.1, on the earlier backbone).
  config.data.crop_scale = (1.0, 1.0)
  config.data.flip_prob = 0.0
  config.label_smoothing = 0.0
  return config
