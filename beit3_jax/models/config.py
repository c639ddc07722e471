"""Model configurations: the named BEiT-3 variants and `get_config`.

`base` and `large` are the released layout (torchscale / unilm `beit3`): decoupled Multiway
attention, vision and language FFN experts, Magneto Sub-LN, patch 16. `giant` is the paper's
layout (arXiv 2208.10442, Table 2): shared attention and a vision-language FFN expert in the
top 3 layers, patch 14.
"""

from __future__ import annotations

import ml_collections

# Every field of a model config, with its default (the released base at 224).
_DEFAULTS = dict(
    embed_dim=768,            # D, width of the residual stream.
    depth=12,                 # number of Multiway encoder layers.
    num_heads=12,             # attention heads; head size is embed_dim // num_heads.
    mlp_dim=3072,             # F, inner width of every FFN expert.
    vocab_size=64010,         # rows of the text embedding (beit3.spm + fairseq offset).
    img_size=224,             # square input images of img_size x img_size pixels.
    patch_size=16,            # P; the image becomes (img_size // P)**2 patches.
    in_chans=3,
    # Rows of the text position table (torchscale's max_source_positions). Positions start at
    # 2 (fairseq), so the longest text is max_text_positions - 2 tokens.
    max_text_positions=1024,
    normalize_output=True,    # final Multiway LayerNorm (off for ImageNet and VQAv2 heads).
    layernorm_eps=1e-5,
    drop_path_rate=0.0,       # layer i drops with rate linspace(0, drop_path_rate, depth)[i].
    # Paper options (default off = the released layout).
    shared_attention=False,   # one attention sublayer (norms and projections) for all tokens.
    num_vl_layers=0,          # top K layers own a vision-language FFN expert `C`.
    # 'unilm' (TN std 0.02 cut at +-1 std, as unilm's BEiT3Wrapper), 'torchscale' (torch
    # defaults + Magneto gain sqrt(log 2L)), or 'beit' (unilm's TN, then the output projections
    # of layer l scaled by 1/sqrt(2l), the paper's BEiT init).
    init='unilm',
    # Std of the normal init of both position tables. 1.0 is torchscale's (nn.Embedding's
    # default) and every scheme above keeps it; 0.02 is BEiT's and ViT's. From scratch, N(0, 1)
    # positions swamp the patch and token embeddings (std ~0.3 and D**-0.5), so every CLS/BOS
    # output starts out nearly the same (mean cosine 0.99 in the demo model) and contrastive
    # and vision-language heads learn slowly or collapse; the demo configs use 0.02.
    position_init_std=1.0,
    dtype='float32',          # compute dtype: 'float32' or 'bfloat16'.
    # Dtype the trainer keeps the parameters in: 'float32', or 'bfloat16' to halve their memory
    # (and their gradients'); modules create them in float32 and compute in `dtype` either way.
    param_dtype='float32',
    remat=False,              # shorthand for remat_policy='full' (kept for older configs).
    # What each layer keeps for the backward pass (`REMAT_POLICIES`): 'none' keeps everything,
    # 'full' recomputes the whole layer, the others save only some products (see encoder.py).
    remat_policy='none',
    # Layers as one `nn.scan` over parameters stacked on a leading `layers` axis (the top
    # vision-language layers of giant as a second scanned group): one layer to compile instead
    # of `depth`. Parameter paths become encoder/layers/... (and encoder/vl_layers/...);
    # conversion and `init_from` translate between the two layouts.
    scan_layers=False,
    # The attention core: 'xla' (einsum + softmax), 'cudnn_or_xla' (jax.nn.dot_product_attention)
    # or 'splash' (the Pallas TPU kernel); see models/attention.py.
    attention='xla',
)

VARIANTS: dict[str, dict] = {
    'base': dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    'giant': dict(embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14,
                  shared_attention=True, num_vl_layers=3),
    # A few-MB model for demos on one CPU (not a released size).
    'small': dict(embed_dim=256, depth=6, num_heads=4, mlp_dim=1024),
}

INIT_SCHEMES = ('unilm', 'torchscale', 'beit')
DTYPES = ('float32', 'bfloat16')
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'save_qkv_proj', 'save_attention_out')
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn_or_xla', 'splash')


def get_config(variant: str = 'base', **overrides) -> ml_collections.ConfigDict:
  """Returns the locked model config of a named variant, with `overrides` applied.

  Args:
    variant: one of `VARIANTS` ('base', 'large', 'giant', 'small').
    **overrides: any config field, e.g. `img_size=384, normalize_output=False`.

  Raises:
    KeyError: unknown variant or unknown field (the message names it).
    ValueError: inconsistent values (e.g. heads do not divide the width).
  """
  if variant not in VARIANTS:
    raise KeyError(f'Unknown model variant {variant!r}; known: {sorted(VARIANTS)}.')
  fields = dict(_DEFAULTS)
  fields.update(VARIANTS[variant])
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f'Unknown model config field(s) {unknown}; known fields: {sorted(fields)}.')
  fields.update(overrides)
  config = ml_collections.ConfigDict(fields)
  config.variant = variant
  validate_config(config)
  config.lock()
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first inconsistent field of a model config."""
  missing = sorted(set(_DEFAULTS) - set(config.keys()))
  if missing:
    raise ValueError(f'Model config lacks field(s) {missing}.')
  if config.embed_dim % config.num_heads:
    raise ValueError(f'embed_dim={config.embed_dim} is not divisible by '
                     f'num_heads={config.num_heads}.')
  if config.img_size % config.patch_size:
    raise ValueError(f'img_size={config.img_size} is not a multiple of '
                     f'patch_size={config.patch_size}.')
  if not 0 <= config.num_vl_layers <= config.depth:
    raise ValueError(f'num_vl_layers={config.num_vl_layers} must lie in [0, depth={config.depth}].')
  if config.init not in INIT_SCHEMES:
    raise ValueError(f'init={config.init!r}; expected one of {INIT_SCHEMES}.')
  if not config.position_init_std > 0:
    raise ValueError(f'position_init_std={config.position_init_std} must be > 0.')
  if config.dtype not in DTYPES:
    raise ValueError(f'dtype={config.dtype!r}; expected one of {DTYPES}.')
  if config.param_dtype not in DTYPES:
    raise ValueError(f'param_dtype={config.param_dtype!r}; expected one of {DTYPES}.')
  if config.max_text_positions < 3:
    raise ValueError('max_text_positions must be >= 3 (positions start at 2).')
  if config.remat_policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy={config.remat_policy!r}; expected one of {REMAT_POLICIES}.')
  if config.remat and config.remat_policy not in ('none', 'full'):
    raise ValueError(f'remat=True means remat_policy=\'full\', but remat_policy='
                     f'{config.remat_policy!r}: set remat=False to use that policy.')
  if config.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention={config.attention!r}; expected one of '
                     f'{ATTENTION_IMPLEMENTATIONS}.')
  if not 0.0 <= config.drop_path_rate < 1.0:
    raise ValueError(f'drop_path_rate={config.drop_path_rate} must lie in [0, 1).')


def remat_policy(config) -> str:
  """The layer's remat policy name: `remat_policy`, or 'full' for the older `remat=True`."""
  if config.remat and config.remat_policy == 'none':
    return 'full'
  return config.remat_policy


def num_patches(config) -> int:
  """Number of image patches N_p = (img_size // patch_size)**2."""
  return (config.img_size // config.patch_size) ** 2


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a model config saved as a dict (e.g. a checkpoint's config.json)."""
  d = dict(d)
  variant = d.pop('variant', 'base')
  if variant not in VARIANTS:
    variant = 'base'  # A renamed or custom variant: every field is given explicitly anyway.
  return get_config(variant, **d)
