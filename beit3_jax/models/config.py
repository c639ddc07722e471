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
    dtype='float32',          # compute dtype: 'float32' or 'bfloat16'. Params are float32.
    remat=False,              # rematerialise each layer in the backward pass (saves memory).
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
  if config.max_text_positions < 3:
    raise ValueError('max_text_positions must be >= 3 (positions start at 2).')
  if not 0.0 <= config.drop_path_rate < 1.0:
    raise ValueError(f'drop_path_rate={config.drop_path_rate} must lie in [0, 1).')


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
