"""BEiT-3 base pretraining with the paper's recipe (arXiv 2208.10442 §2.3, Table 11), TPU pods.

1M steps of 2048 images (ImageNet, MIM on 40% block-masked patches) + 2048 texts (MLM, 15%) +
2048 image-text pairs (MLM on 50% of the caption), 224 px, AdamW (0.9, 0.98, eps 1e-6), lr 1e-3
after 10k warmup steps, cosine decay, weight decay 0.05, clipping 3.0, drop path 0.1.

Prepare the data once (TFDS manual downloads; nothing is downloaded at run time):
    tfds build imagenet2012 --data_dir=gs://BUCKET/data/tfds --file_format=array_record \
        --manual_dir=...
    tfds build coco_captions --data_dir=gs://BUCKET/data/tfds --file_format=array_record
    tfds build wikipedia/20230601.en --data_dir=gs://BUCKET/data/tfds \
        --file_format=array_record
and convert the BEiT v2 tokenizer and get the vocabulary (both downloaded by you):
    python -m beit3_jax.convert to-flax vqkd_encoder_base_decoder_3x768x12_clip.pth \
        gs://BUCKET/vqkd_base --model vqkd --variant base

Command (every host of a TPU slice, see launch/README.md):
    bash launch/tpu_pod.sh run beit3_jax.main --config=configs/pretrain/base.py \
        --workdir=gs://BUCKET/runs/beit3_base --config.data.data_dir=gs://BUCKET/data \
        --config.tokenizer.path=gs://BUCKET/vqkd_base --config.data.spm_path=gs://BUCKET/beit3.spm

Made for a v5p-128 slice (64 chips), data parallel, scanned layers, no remat. Plan it (no TPU
needed): python -m beit3_jax.plan --config=configs/pretrain/base.py
Expect from the plan (docs/performance.md): fits, 45.8 of 95 GiB per chip at the peak, compile
about 125 s, roofline bound 71 ms per step (MFU <= 32%).

Expect: 220,987,392 backbone parameters (+ the two heads); the paper's run took 1M steps on
far more data than these three TFDS sets (Table 3 of arXiv 2208.10442: 21M image-text pairs,
14M ImageNet-21K images and 160 GB of text; see docs/references.md). This repository has not
run it: no TPU was available to us.
"""

from beit3_jax.defaults import pretrain_config


def get_config(arg=None):
  del arg
  config = pretrain_config()
  config.data.text = 'wikipedia/20230601.en'
  # Wikipedia has only a train split: its last 0.1% (about 6,400 articles) is held out.
  config.data.splits = {'text': {'train': 'train[:99.9%]', 'eval': 'train[99.9%:]'}}
  config.model.dtype = 'bfloat16'
  config.model.scan_layers = True
  config.tpu_slice = 'v5p-128'
  config.mesh_shape = (-1, 1, 1)
  # Worker processes on each host, each making whole steps: a v5p host has 208 vCPUs, and this
  # recipe's planned step time needs about 15% of them (docs/performance.md, "What a TPU host
  # needs"); 48 leaves room for slower images than the measured ones.
  config.data.workers = 48
  config.data.read_threads = 0
  return config
