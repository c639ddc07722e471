"""BEiT-3 models: the Multiway backbone, its variants and configs."""

from beit3_jax.models.beit3 import (BEiT3, BEiT3Output, abstract_params, count_params,
                                    example_inputs, init_params, split_position)
from beit3_jax.models.config import VARIANTS, get_config, num_patches
from beit3_jax.models.positions import resize_vision_positions

__all__ = [
    'BEiT3', 'BEiT3Output', 'VARIANTS', 'abstract_params', 'count_params', 'example_inputs',
    'get_config', 'init_params', 'num_patches', 'resize_vision_positions', 'split_position',
]
