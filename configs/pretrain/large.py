"""BEiT-3 large pretraining (the released large layout: 24 layers, 1024 wide), TPU pods.

The base recipe (configs/pretrain/base.py; same data preparation and command with
`--config=configs/pretrain/large.py`) with the large model, bfloat16 compute, scanned and
rematerialised layers and the parameters and optimizer state sharded over an `fsdp` axis of 8
devices; made for a v5p-256 slice (128 chips). Plan it (no TPU needed):
    python -m beit3_jax.plan --config=configs/pretrain/large.py

Expect: 672,702,464 backbone parameters (+ heads). Not run by us (no TPU available).
"""

from beit3_jax.models import get_config as model_config
from configs.pretrain import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.model = model_config('large', drop_path_rate=0.1, dtype='bfloat16', remat=True,
                              scan_layers=True, init='beit')
  config.tpu_slice = 'v5p-256'
  config.mesh_shape = (-1, 8, 1)
  return config
