"""BEiT-3 large fine-tuning for image-text retrieval on COCO (default) or Flickr30k, 384 px.

Recipe (unilm beit3/get_started/get_started_for_retrieval.md, the large command): 384 x 384
images, batch 3072 (2 x 16 GPUs x 96), lr 5e-5, layer decay 0.85, drop path 0.2, weight decay
0.05, activation checkpointing (here model.remat), starting from the ITC-tuned
`beit3_large_itc_patch16_224.pth`; COCO: 15 epochs, 3 warmup epochs; Flickr30k: 20 epochs, 5
warmup epochs (the doc gives the Flickr30k lr 1e-4 for base only; large keeps 5e-5). Defaults of
unilm beit3/run_beit3_finetuning.py for the rest: AdamW (0.9, 0.999) eps 1e-8, min lr 1e-6, no
gradient clipping, 64 text tokens (--num_max_bpe_tokens); the retrieval model keeps the final
backbone norm. unilm's training set has one item per image-caption pair, so epochs -> steps (its
`cosine_scheduler`: steps per epoch = pairs // batch) use the caption count: COCO Karpathy train
+ restval 566,747 captions of 113,287 images (dataset_coco.json) // 3072 = 184 steps per epoch
-> 2,760 steps, 552 warmup; Flickr30k Karpathy train 145,000 captions of 29,000 images // 3072 =
47 -> 940 steps, 235 warmup. (Here an example is an image with one of its captions drawn at
random, so the same number of steps sees as many pairs as unilm's epochs.) Validation every
epoch over the whole validation split (5,000 COCO / 1,014 Flickr30k images with all their
captions).

Prepare the data once (nothing is downloaded; Karpathy's dataset_coco.json /
dataset_flickr30k.json and the images, layout in beit3_jax/data/builders/karpathy_captions.py)
as the TFDS data sets `beit3_coco_karpathy` / `beit3_flickr30k_karpathy` (features
image_bytes, captions, ...; splits train = train + restval / validation / test):
    python -c "from beit3_jax.data.builders import karpathy_captions as k; \
        k.prepare('coco', manual_dir='/data/coco')"       # or 'flickr30k', '/data/flickr30k'
Convert unilm's ITC-tuned weights (downloaded by you) with their retrieval heads and resize
the vision position table to 384 px (bicubic, as unilm's `load_model_and_may_interpolate`;
init_from does not resize by itself):
    python -m beit3_jax.convert to-flax beit3_large_itc_patch16_224.pth ckpt/beit3_large_itc \
        --variant large --task retrieval
    python -c "from beit3_jax import params_io; \
        from beit3_jax.models import resize_vision_positions as r; \
        t, p, c, s = params_io.load_task_params('ckpt/beit3_large_itc'); \
        p['beit3'], c = r(p['beit3'], c, 384); \
        params_io.save_params('ckpt/beit3_large_itc_384', p, c, task=t, head_sizes=s)"
(from a backbone only -- beit3_large_patch16_224.pth or a pretraining workdir -- resize as in
configs/finetune/vqa_large.py; the heads then start fresh, and unilm's ITC intermediate
tuning is missing). Get unilm's `beit3.spm` too.

Command (COCO; append `:flickr30k` to the config path for Flickr30k):
    python -m beit3_jax.main --config=configs/finetune/retrieval_large.py \
        --workdir=workdirs/coco_retrieval_large --config.init_from=ckpt/beit3_large_itc_384 \
        --config.data.spm_path=/path/to/beit3.spm
Add --config.data.data_dir=DIR if the data was prepared outside the default data dir. Score
the Karpathy test split (5k COCO / 1k Flickr30k images) afterwards with
    ... --config.mode=eval --config.data.eval_split=test

Expect (beit3_reference.md §6, unilm README, retrieval @384 from -itc): COCO 5k test IR@1 63.4
/ TR@1 82.1 (retrieval/t2i_r1 / retrieval/i2t_r1); Flickr30k 1k test IR@1 88.1 / TR@1 97.2.
This repository has not run it.

Deviations from unilm: the warmup starts at 0, not at warmup_lr 1e-6; bfloat16 compute
instead of DeepSpeed fp16; a batch holds distinct images (unilm's pair items can put one image
twice in a batch). (unilm's retrieval recipe uses no RandAugment and no EMA.)
"""

from beit3_jax.models import get_config as model_config
from beit3_jax.train.finetune import finetune_config

BATCH_SIZE = 3072                       # get_started: 2 nodes x 16 GPUs x --batch_size 96
# Per data set: (TFDS name, training pairs, lr, epochs, warmup epochs), get_started's values.
DATASETS = {
    'coco': ('beit3_coco_karpathy', 566_747, 5e-5, 15, 3),
    'flickr30k': ('beit3_flickr30k_karpathy', 145_000, 5e-5, 20, 5),
}


def get_config(arg=None):
  name = arg or 'coco'
  if name not in DATASETS:
    raise ValueError(f'retrieval config argument {name!r}; expected one of {sorted(DATASETS)}.')
  source, pairs, lr, epochs, warmup_epochs = DATASETS[name]
  steps_per_epoch = pairs // BATCH_SIZE   # COCO 184, Flickr30k 47 (unilm: len // batch)

  config = finetune_config('retrieval')
  # beit3_large_patch16_384_retrieval; --input_size 384, --drop_path 0.2,
  # --checkpoint_activations -> remat.
  config.model = model_config('large', img_size=384, drop_path_rate=0.2,
                              normalize_output=True, vocab_size=64010, dtype='bfloat16',
                              remat=True)
  config.init_from = ''                 # pass --config.init_from (see the docstring)

  d = config.data
  d.source = source                     # beit3_jax/data/builders/karpathy_captions.py
  d.fields.update({'image': 'image_bytes', 'captions': 'captions'})
  d.train_split = 'train'               # Karpathy train + restval (COCO)
  d.eval_split = 'validation'
  d.spm_path = ''                       # pass --config.data.spm_path=<unilm's beit3.spm>
  d.text_len = 64                       # run_beit3_finetuning.py --num_max_bpe_tokens
  d.crop_scale = (0.5, 1.0)             # datasets.py build_transform: RandomResizedCrop
  d.flip_prob = 0.5
  d.image_mean = (0.5, 0.5, 0.5)        # datasets.py: IMAGENET_INCEPTION_MEAN / STD
  d.image_std = (0.5, 0.5, 0.5)
  d.read_threads = 16

  config.batch_size = BATCH_SIZE
  o = config.optimizer
  o.lr = lr                             # get_started: --lr 5e-5
  o.min_lr = 1e-6                       # run_beit3_finetuning.py --min_lr default
  o.warmup_steps = warmup_epochs * steps_per_epoch   # COCO 552, Flickr30k 235
  o.weight_decay = 0.05                 # get_started: --weight_decay 0.05
  o.layer_decay = 0.85                  # get_started: --layer_decay 0.85
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # run_beit3_finetuning.py --opt_betas / --opt_eps
  o.clip_norm = 0.0                     # --clip_grad None

  config.total_steps = epochs * steps_per_epoch      # COCO 2,760, Flickr30k 940
  config.eval_every = steps_per_epoch   # unilm evaluates every epoch
  config.eval_batches = 2               # 6,144 >= every validation image (5,000 / 1,014)
  config.checkpoint_every = steps_per_epoch
  config.log_every = 20
  return config
