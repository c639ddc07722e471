"""Visual tokenizers: the BEiT v2 VQ-KD whose token ids are BEiT-3's image targets."""

from beit3_jax.tokenizers.convert import (load_vqkd_torch, save_vqkd_torch, vqkd_flax_to_torch,
                                          vqkd_torch_to_flax)
from beit3_jax.tokenizers.vqkd import (VARIANTS, VQKD, VQKDConfig, abstract_variables,
                                       example_images, get_vqkd_config, init_vqkd, nearest_code,
                                       resize_pos_embed, to_tokenizer_range, token_grid,
                                       tokenizer_view_size)

__all__ = [
    'VARIANTS', 'VQKD', 'VQKDConfig', 'abstract_variables', 'example_images', 'get_vqkd_config',
    'init_vqkd', 'load_vqkd_torch', 'nearest_code', 'resize_pos_embed', 'save_vqkd_torch',
    'to_tokenizer_range', 'token_grid', 'tokenizer_view_size', 'vqkd_flax_to_torch',
    'vqkd_torch_to_flax',
]
