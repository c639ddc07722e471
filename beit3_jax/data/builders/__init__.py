"""TFDS builders of the project's data sets; nothing here downloads.

- `synthetic_world_builder`: the built-in synthetic world (images with captions, labels and
  questions; NLVR2-style image pairs; a text corpus), rendered locally.
- `karpathy_captions`: COCO and Flickr30k with Karpathy's splits, from the official files in a
  manual dir (captioning and retrieval).
- `imagenet`: ImageNet-1k (ILSVRC2012) from the official tars or extracted folders in a manual
  dir (classification; registered as `beit3_imagenet2012`).
- `vqa_nlvr2`: VQAv2 (answer vocabulary and soft scores as unilm) and NLVR2, from the official
  files in a manual dir.

Import a module (or call its `prepare`) to register its builders with TFDS; reading a prepared
data set back with `tfds.data_source` or `tfds_sources.open_source` needs no import.
"""
