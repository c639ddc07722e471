"""BEiT-3 base fine-tuning on NLVR2 (visual reasoning over image pairs), unilm's recipe, 224 px.

Recipe (unilm beit3/get_started/get_started_for_nlvr2.md, the base command): batch 256
(8 GPUs x 32), lr 7e-4 (5e-4 for base-indomain), layer decay 0.65, 20 epochs with 5 warmup
epochs, drop path 0.2, weight decay 0.2. Defaults of unilm beit3/run_beit3_finetuning.py for
the rest: AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no gradient clipping, 64 text tokens
(--num_max_bpe_tokens); `beit3_base_patch16_224_nlvr2` keeps the final backbone norm
(normalize_output=True). Epochs -> steps as unilm's `cosine_scheduler`: steps per epoch =
86,373 NLVR2 train statements (lil-lab/nlvr nlvr2/data/train.json) // 256 = 337, so 20 epochs
= 6,740 steps and 5 warmup epochs = 1,685 steps. Validation every epoch on the dev split:
27 batches = 6,912 of its 6,982 examples (batches are whole).

Prepare the data once (nothing is downloaded; the official files, layout in
beit3_jax/data/builders/vqa_nlvr2.py: train.json / dev.json / test1.json and the images) as the
TFDS data set `beit3_nlvr2` (features image_a_bytes, image_b_bytes, statement, label;
splits train / validation = dev / test = test1, i.e. test-P):
    python -c "from beit3_jax.data.builders import vqa_nlvr2; \
        vqa_nlvr2.prepare('nlvr2', manual_dir='/data/nlvr2')"
convert unilm's pretrained weights (downloaded by you) and get unilm's `beit3.spm`:
    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth ckpt/beit3_base \
        --variant base

Command:
    python -m beit3_jax.main --config=configs/finetune/nlvr2_base.py \
        --workdir=workdirs/nlvr2_base --config.init_from=ckpt/beit3_base \
        --config.data.spm_path=/path/to/beit3.spm
`init_from` may also be a pretraining workdir of ours (configs/pretrain/base.py): its
backbone is taken, the head starts fresh. Add --config.data.data_dir=DIR if the data was
prepared outside the default data dir. Score test-P afterwards with
    ... --config.mode=eval --config.data.eval_split=test --config.eval_batches=27

Expect (beit3_reference.md §6, unilm README): dev 83.6 / test-P 84.4 accuracy (unilm's
fine-tuned base: test Acc 84.386 in get_started_for_nlvr2.md). This repository has not run it.

Deviations from unilm: the warmup starts at 0, not at warmup_lr 1e-6; bfloat16 compute
instead of DeepSpeed fp16. (unilm's NLVR2 recipe uses no RandAugment and no EMA.)
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config

TRAIN_EXAMPLES = 86_373                 # NLVR2 train.json statements
BATCH_SIZE = 256                        # get_started: 8 GPUs x --batch_size 32
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE   # 337, as unilm (len // batch)
EPOCHS, WARMUP_EPOCHS = 20, 5           # get_started: --epochs 20 --warmup_epochs 5


def get_config(arg=None):
  del arg
  config = finetune_config('nlvr2')
  # beit3_base_patch16_224_nlvr2 (final norm kept); --drop_path 0.2.
  config.model = model_config('base', img_size=224, drop_path_rate=0.2,
                              normalize_output=True, vocab_size=64010, dtype='bfloat16')
  config.init_from = ''                 # pass --config.init_from (see the docstring)

  d = config.data
  d.source = 'beit3_nlvr2'              # beit3_jax/data/builders/vqa_nlvr2.py
  d.fields.update({'image_a': 'image_a_bytes', 'image_b': 'image_b_bytes',
                   'statement': 'statement', 'label': 'label'})
  d.train_split = 'train'
  d.eval_split = 'validation'           # NLVR2 dev
  d.spm_path = ''                       # pass --config.data.spm_path=<unilm's beit3.spm>
  d.text_len = 64                       # run_beit3_finetuning.py --num_max_bpe_tokens
  d.crop_scale = (0.5, 1.0)             # datasets.py build_transform: RandomResizedCrop
  d.flip_prob = 0.5
  d.image_mean = (0.5, 0.5, 0.5)        # datasets.py: IMAGENET_INCEPTION_MEAN / STD
  d.image_std = (0.5, 0.5, 0.5)
  d.read_threads = 16

  config.batch_size = BATCH_SIZE
  o = config.optimizer
  o.lr = 7e-4                           # get_started: --lr 7e-4
  o.min_lr = 1e-6                       # run_beit3_finetuning.py --min_lr default
  o.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH   # 1,685
  o.weight_decay = 0.2                  # get_started: --weight_decay 0.2
  o.layer_decay = 0.65                  # get_started: --layer_decay 0.65
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # run_beit3_finetuning.py --opt_betas / --opt_eps
  o.clip_norm = 0.0                     # --clip_grad None

  config.total_steps = EPOCHS * STEPS_PER_EPOCH      # 6,740
  config.eval_every = STEPS_PER_EPOCH   # unilm evaluates every epoch
  config.eval_batches = 27              # 6,912 of the 6,982 dev examples
  config.checkpoint_every = STEPS_PER_EPOCH
  config.log_every = 50
  return config
