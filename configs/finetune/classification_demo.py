"""Demo fine-tuning: image classification of the built-in data from the demo pretraining.

Classifies each built-in image by its largest object's shape (4 classes) with `ImageClassifier`,
starting from the backbone of the demo pretraining run (configs/pretrain/demo.py, workdir
workdirs/demo; its MIM/MLM heads are dropped, the classification head starts fresh).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/classification_demo.py \
        --workdir=workdirs/finetune_cls_demo

Add `--config.init_from=''` to train the same model from a random initialisation instead.
150 steps of 32 images (64 px), validation accuracy every 50 steps on the validation split
(7 batches = 224 of its 250 images) against the majority-class baseline
(val classification/baseline_accuracy in metrics.jsonl).

Status (issue 6, work in progress), measured 2026-11-28 on 2 cores: these 150 steps do NOT yet
beat the baseline: validation accuracy 0.266 vs majority class 0.277 from the demo checkpoint,
0.259 vs 0.272 from random init (training loss stays at ln 4).
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config


def get_config(arg=None):
  del arg
  config = finetune_config('classification')
  config.init_from = 'workdirs/demo'
  config.total_steps = 150
  config.checkpoint_every = 150
  config.log_every = 10
  config.eval_every = 50
  config.eval_batches = 7
  # The demo pretraining's model, without the final norm (as unilm's classification models).
  config.model = model_config('small', embed_dim=128, depth=4, num_heads=4, mlp_dim=512,
                              img_size=64, patch_size=8, vocab_size=128, max_text_positions=34,
                              drop_path_rate=0.0, normalize_output=False)
  config.num_classes = 4
  config.label_smoothing = 0.1
  config.data.source = 'builtin:images'
  config.data.crop_scale = (0.5, 1.0)
  config.data.read_threads = 2
  config.batch_size = 32
  config.optimizer.lr = 1e-3
  config.optimizer.min_lr = 1e-5
  config.optimizer.warmup_steps = 15
  config.optimizer.layer_decay = 0.75
  return config
