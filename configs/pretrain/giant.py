"""BEiT-3 giant pretraining, the paper's layout (Table 2): 40 layers, 1408 wide, patch 14,
shared attention and a vision-language FFN in the top 3 layers; TPU pods.

The base recipe (configs/pretrain/base.py; same data preparation and command with
`--config=configs/pretrain/giant.py`). Patch 14 at 224 px gives a 16 x 16 grid, so the
tokenizer is fed a 256 px view of the same crop (set automatically from the grid).
Made for a v5p-512 slice (256 chips): parameters and optimizer state sharded over an `fsdp` axis
of 128 chips (the width 1408 = 11 x 128), data parallel over the rest (2 ways; 4 on two slices
with --num_slices=2 in the planner), scanned layers, full remat, bfloat16 compute.

Plan it (no TPU needed): python -m beit3_jax.plan --config=configs/pretrain/giant.py
Expect from the plan (docs/performance.md): fits, 2.8 of 95 GiB per chip at the peak, compile
about 200 s, roofline bound 183 ms per step (MFU <= 39%).
Expect: 1,848,320,384 backbone parameters (the paper's 1.9B, with heads). Not run by us.
"""

from beit3_jax.models import get_config as model_config
from configs.pretrain import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.model = model_config('giant', drop_path_rate=0.1, dtype='bfloat16', remat=True,
                              scan_layers=True, init='beit')
  config.tpu_slice = 'v5p-512'
  # FSDP over 128 chips of a slice (1408 = 11 x 128 divides), data parallel over the rest.
  config.mesh_shape = (-1, 128, 1)
  return config
