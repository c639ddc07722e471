"""BEiT-3 large fine-tuning for COCO captioning (Karpathy splits), unilm's recipe, 480 px.

Recipe (unilm beit3/get_started/get_started_for_captioning.md, the large command): 480 x 480
images, batch 256 (8 GPUs x 32), lr 8e-6, layer decay 1.0, 10 epochs with 1 warmup epoch, drop
path 0.1, weight decay 0.05, RandAugment, 32 text tokens (--num_max_bpe_tokens 32), mask prob
0.7 (--captioning_mask_prob 0.7; the paper's Table 13 and the script default say 0.6),
drop-worst after 12,000 steps, activation checkpointing (here model.remat). Defaults of unilm
beit3/run_beit3_finetuning.py for the rest: label smoothing 0.1, beam 3, length penalty 0.6,
AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no gradient clipping; the captioning model keeps the
final backbone norm. unilm's training set has one item per image-caption pair, so epochs ->
steps (its `cosine_scheduler`: steps per epoch = pairs // batch) use the caption count: COCO
Karpathy train + restval 566,747 captions of 113,287 images (dataset_coco.json) // 256 = 2213
steps per epoch -> 22,130 steps, 2,213 warmup. (Here an example is an image with one of its
captions drawn at random, so the same number of steps sees as many pairs.) Validation every
epoch: beam-search captions of all 5,000 Karpathy validation images, CIDEr-D and BLEU-4
against their references (captioning/* in metrics.jsonl).

Prepare the data once (nothing is downloaded; Karpathy's dataset_coco.json and the COCO 2014
images, layout in beit3_jax/data/builders/karpathy_captions.py) as the TFDS data set
`beit3_coco_karpathy` (features image_bytes, captions, ...; splits train = train + restval /
validation / test):
    python -c "from beit3_jax.data.builders import karpathy_captions as k; \
        k.prepare('coco', manual_dir='/data/coco')"
Convert unilm's pretrained 224 px weights (downloaded by you) and resize their vision position
table to 480 px (init_from does not resize by itself) -- the same ckpt/beit3_large_480 as in
configs/finetune/vqa_large.py:
    python -m beit3_jax.convert to-flax beit3_large_patch16_224.pth ckpt/beit3_large \
        --variant large
    python -c "from beit3_jax import params_io; \
        from beit3_jax.models import resize_vision_positions as r; \
        c = params_io.load_model_config('ckpt/beit3_large'); \
        p, c = r(params_io.load_params('ckpt/beit3_large', c), c, 480); \
        params_io.save_params('ckpt/beit3_large_480', p, c)"
Get unilm's `beit3.spm` too.

Command:
    python -m beit3_jax.main --config=configs/finetune/captioning_large.py \
        --workdir=workdirs/coco_captioning_large --config.init_from=ckpt/beit3_large_480 \
        --config.data.spm_path=/path/to/beit3.spm
Add --config.data.data_dir=DIR if the data was prepared outside the default data dir. Score
the Karpathy test split afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Expect (beit3_reference.md §6, unilm README): COCO Karpathy test CIDEr 143.2 (no CIDEr
optimisation). Our CIDEr-D is computed in-process (beit3_jax.tasks.metrics, checked against
pycocoevalcap) on our tokenisation of the references, close to but not the COCO caption
evaluation toolkit's PTB tokenisation. This repository has not run it.

Deviations from unilm: no RandAugment (2 ops, magnitude 7); no drop-worst (unilm drops the 20%
highest-loss tokens after 12,000 steps); label smoothing puts eps / V on every class (unilm
eps / (V - 1) on the others); the warmup starts at 0, not at warmup_lr 1e-6; bfloat16 compute
instead of DeepSpeed fp16. (unilm's captioning recipe uses no EMA.)
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config

TRAIN_PAIRS = 566_747                   # COCO Karpathy train + restval captions
BATCH_SIZE = 256                        # get_started: 8 GPUs x --batch_size 32
STEPS_PER_EPOCH = TRAIN_PAIRS // BATCH_SIZE      # 2213, as unilm (len // batch)
EPOCHS, WARMUP_EPOCHS = 10, 1           # get_started: --epochs 10 --warmup_epochs 1


def get_config(arg=None):
  del arg
  config = finetune_config('captioning')
  # beit3_large_patch16_480_captioning; --input_size 480, --drop_path 0.1,
  # --checkpoint_activations -> remat.
  config.model = model_config('large', img_size=480, drop_path_rate=0.1,
                              normalize_output=True, vocab_size=64010, dtype='bfloat16',
                              remat=True)
  config.init_from = ''                 # pass --config.init_from (see the docstring)
  config.label_smoothing = 0.1          # run_beit3_finetuning.py --label_smoothing default
  c = config.captioning
  c.mask_prob = 0.7                     # get_started: --captioning_mask_prob 0.7
  c.beam_size = 3                       # --num_beams default
  c.length_penalty = 0.6                # --length_penalty default
  c.max_len = 32                        # get_started: --num_max_bpe_tokens 32
  c.eval_examples = 5000                # the whole Karpathy validation split

  d = config.data
  d.source = 'beit3_coco_karpathy'      # beit3_jax/data/builders/karpathy_captions.py
  d.fields.update({'image': 'image_bytes', 'captions': 'captions'})
  d.train_split = 'train'               # Karpathy train + restval
  d.eval_split = 'validation'
  d.spm_path = ''                       # pass --config.data.spm_path=<unilm's beit3.spm>
  d.text_len = 32                       # get_started: --num_max_bpe_tokens 32
  d.crop_scale = (0.5, 1.0)             # datasets.py build_transform: RandomResizedCrop
  d.flip_prob = 0.5
  d.image_mean = (0.5, 0.5, 0.5)        # datasets.py: IMAGENET_INCEPTION_MEAN / STD
  d.image_std = (0.5, 0.5, 0.5)
  d.read_threads = 16

  config.batch_size = BATCH_SIZE
  o = config.optimizer
  o.lr = 8e-6                           # get_started: --lr 8e-6
  o.min_lr = 1e-6                       # run_beit3_finetuning.py --min_lr default
  o.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH   # 2,213
  o.weight_decay = 0.05                 # get_started: --weight_decay 0.05
  o.layer_decay = 1.0                   # get_started: --layer_decay 1.0
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # run_beit3_finetuning.py --opt_betas / --opt_eps
  o.clip_norm = 0.0                     # --clip_grad None

  config.total_steps = EPOCHS * STEPS_PER_EPOCH      # 22,130
  config.eval_every = STEPS_PER_EPOCH   # unilm evaluates every epoch
  config.eval_batches = 20              # 5,120 >= the 5,000 validation images
  config.checkpoint_every = STEPS_PER_EPOCH
  config.log_every = 100
  return config
