"""Demo fine-tuning: image captioning on the built-in captions, from the demo pretraining.

Masked fine-tuning of `CaptioningModel` (captioning attention mask, 60% of each caption's
tokens masked, label smoothing 0.1) from the backbone of the demo pretraining run
(configs/pretrain/demo.py in workdirs/demo; its MLM head is not reused, `mlm_head` starts
fresh). Validation generates a caption for the first 224 validation images (beam 3, length
penalty 0.6, at most 20 tokens, with the key/value cache) and scores CIDEr-D and BLEU-4
against their 5 references (val captioning/* in metrics.jsonl), against always emitting the
most common training caption (captioning/baseline_cider).

Command (from the repository root, after the demo pretraining):

    .venv/bin/python -m beit3_jax.main --config=configs/finetune/captioning_demo.py \
        --workdir=workdirs/finetune_captioning_demo

Add `--config.init_from=''` to start from a random initialisation instead.

Measured 2026-11-28 on 2 cores (about 8 minutes): CIDEr-D 0.541 (BLEU-4 0.408) against 0.339
(BLEU-4 0.357) for always emitting the most common training caption: 1.6x, short of the 2x
issue 6 asks for. The model emits the same short caption ("there is one object") for most
images: it has not learned to condition on the image yet. From a random initialisation the
same 600 steps reach CIDEr-D 0.361 (BLEU-4 0.018).
"""

from beit3_jax.train.finetune import demo_config


def get_config(arg=None):
  del arg
  config = demo_config('captioning')
  config.total_steps = 600
  config.checkpoint_every = 600
  config.eval_every = 300
  return config
