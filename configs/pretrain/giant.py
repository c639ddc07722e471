"""BEiT-3 giant pretraining, the paper's layout (Table 2): 40 layers, 1408 wide, patch 14,
shared attention and a vision-language FFN in the top 3 layers; TPU pods.

The base recipe (configs/pretrain/base.py; same data preparation and command with
`--config=configs/pretrain/giant.py`). Patch 14 at 224 px gives a 16 x 16 grid, so the
tokenizer is fed a 256 px view of the same crop (set automatically from the grid).
Parameters and optimizer state are fully sharded (`fsdp` over every device), layers are
rematerialised, compute is bfloat16.

Expect: 1,848,320,384 backbone parameters (the paper's 1.9B, with heads). Not run by us.
"""

from beit3_jax.models import get_config as model_config
from configs.pretrain import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.model = model_config('giant', drop_path_rate=0.1, dtype='bfloat16', remat=True)
  config.mesh_shape = (1, -1, 1)
  return config
