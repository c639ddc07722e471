r"""BEiT-3 base fine-tuning on VQAv2, unilm's recipe, 480 px.

unilm's base command (get_started_for_vqav2.md): lr 3e-5, drop path 0.1; with both sizes' batch
128, 10 epochs (50,780 steps with an estimated 650,000 questions), layer decay 1.0, weight decay
0.01, betas (0.9, 0.98). The recipe's sources, the steps, the data and the deviations: `vqa`
and `VQA` in beit3_jax/tasks/recipes.py.

Prepare the TFDS data set `beit3_vqav2/default` in /data/beit3 as `vqa` says (it writes the
answer vocabulary this config reads) and convert unilm's beit3_base_patch16_224.pth to
ckpt/beit3_base (its position table is resized to 480 px on load):
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base
Get unilm's `beit3.spm` too.

Command (after `:` the data dir the data was prepared in, or an answer_vocabulary.json, see
`vqa`; without it the built-in data's 18 answers stand in, with a warning: do not train so):
    python -m beit3_jax.main --config=configs/finetune/vqa_base.py:/data/beit3 \
        --workdir=workdirs/vqav2_base --config.init_from=ckpt/beit3_base \
        --config.data.spm_path=/path/to/beit3.spm

Made for a v5p-8 slice (4 chips): data parallel, scanned layers, no remat. Plan it (no TPU
needed):
    python -m beit3_jax.plan --config=configs/finetune/vqa_base.py
Expect from the plan (docs/performance.md): fits, 74.3 of 95 GiB per chip at the peak, compile
about 42 s on a 2-core host, roofline bound 120 ms per step (MFU <= 35%). On v4-8 (32 GiB per
chip) it needs --config.model.remat=True (9.0 GiB at the peak).

Expect (the results table of unilm's beit3/README.md, github.com/microsoft/unilm): VQAv2
test-dev 77.65 (VQA accuracy; the
evaluation server scores test-dev, this job reports the held-out validation split, which is
not comparable). This repository has not run it.

The head trains at 20x the backbone's lr (unilm's --task_head_lr_weight 20).
Deviations from unilm (all of them in `vqa`): the warmup peaks one step later; bfloat16
compute; the held-out validation images are chosen by hash. The targets are unilm's soft scores
of the 10 answers.
"""

from beit3_jax.tasks import recipes


def get_config(arg=None):
  return recipes.vqa('base', arg)
