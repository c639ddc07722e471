"""The PyTorch reference for parity tests: torchscale 0.3.0's BEiT3, built and run carefully.

The traps this module avoids, found by running torchscale 0.3.0 (PyPI) and reading its
torchscale/architecture/config.py, architecture/encoder.py, component/multihead_attention.py,
component/droppath.py and model/BEiT3.py (github.com/microsoft/torchscale; docs/references.md):
- `import timm` fails here (its data package needs a CUDA torchvision), but torchscale imports
  `timm.models.layers.drop_path`. We load timm's own `drop.py` (it imports only torch) and
  stand it in for `timm.models.layers` while torchscale is imported, then remove the stand-ins.
- `EncoderConfig(**kw)` ignores unknown keys: the config is built from a checked field list.
- `no_output_layer` must be True, or `encoder_out` becomes vocabulary logits.
- A bool `attn_mask` does not mask in torchscale 0.3.0: callers pass int64 0/1.
- LayerNorms, CLS and mask tokens start constant, so A and B experts are equal at init:
  `build_reference` perturbs every constant-initialised parameter.
- The final norm hides per-layer errors: `run_reference` also returns every hidden state.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import numpy as np


def import_torchscale():
  """Imports torchscale's BEiT3 and EncoderConfig without importing the real timm.

  The stand-in `timm` modules live in sys.modules only while torchscale is imported, so that
  later code (e.g. transformers probing `importlib.util.find_spec('timm')`) sees the real,
  installed package.
  """
  if 'torchscale.model.BEiT3' not in sys.modules:
    spec = importlib.util.find_spec('timm')
    if spec is None or not spec.submodule_search_locations:
      raise ImportError('timm==0.6.13 (a torchscale dependency) is not installed.')
    drop_file = pathlib.Path(list(spec.submodule_search_locations)[0]) / 'models/layers/drop.py'
    drop_spec = importlib.util.spec_from_file_location('timm.models.layers.drop', drop_file)
    drop = importlib.util.module_from_spec(drop_spec)
    drop_spec.loader.exec_module(drop)
    layers = types.ModuleType('timm.models.layers')
    layers.drop_path = drop.drop_path
    layers.DropPath = drop.DropPath
    stand_ins = {'timm': types.ModuleType('timm'), 'timm.models': types.ModuleType('timm.models'),
                 'timm.models.layers': layers, 'timm.models.layers.drop': drop}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
      importlib.import_module('torchscale.model.BEiT3')
    finally:
      for name, module in saved.items():
        if module is None:
          sys.modules.pop(name, None)
        else:
          sys.modules[name] = module
  from torchscale.architecture.config import EncoderConfig
  from torchscale.model.BEiT3 import BEiT3
  return EncoderConfig, BEiT3


def encoder_config(cfg):
  """torchscale EncoderConfig equal to our model config, from a checked field list."""
  EncoderConfig, _ = import_torchscale()
  fields = dict(
      encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
      encoder_ffn_embed_dim=cfg.mlp_dim, encoder_layers=cfg.depth, vocab_size=cfg.vocab_size,
      img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
      max_source_positions=cfg.max_text_positions, normalize_output=cfg.normalize_output,
      layernorm_eps=cfg.layernorm_eps, drop_path_rate=cfg.drop_path_rate,
      multiway=True, layernorm_embedding=False, no_output_layer=True,
      checkpoint_activations=False, share_encoder_input_output_embed=False)
  ec = EncoderConfig(**fields)
  for k, v in fields.items():  # EncoderConfig silently drops misspelled keys
    assert getattr(ec, k) == v, (k, getattr(ec, k), v)
  return ec


def build_reference(cfg, seed: int = 0, init: str = 'torchscale', perturb: float = 0.1):
  """torchscale BEiT3 in eval mode with random weights and no constant parameter left.

  init: 'torchscale' keeps torchscale's own init (torch defaults + Magneto gain); 'unilm'
  re-initialises every Linear like unilm's BEiT3Wrapper (TN std 0.02 cut at +-0.02, bias 0).
  Then every constant-initialised parameter (norms, CLS and mask tokens, and the zero biases of
  the unilm init) gets N(0, perturb) noise (N(0, 0.02) for the biases), so A and B differ.
  """
  import torch
  _, BEiT3 = import_torchscale()
  torch.manual_seed(seed)
  model = BEiT3(encoder_config(cfg)).eval()
  with torch.no_grad():
    if init == 'unilm':
      for m in model.modules():
        if isinstance(m, torch.nn.Linear):
          torch.nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
          m.bias.normal_(0.0, 0.02)
    elif init != 'torchscale':
      raise ValueError(init)
    for name, p in model.named_parameters():
      constant = ('layer_norm' in name or 'inner_attn_ln' in name or 'ffn_layernorm' in name
                  or name.endswith(('cls_token', 'mask_token')))
      if constant:
        p.add_(perturb * torch.randn_like(p))
  return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def run_reference(model, text_ids=None, text_padding_mask=None, images=None, image_mask=None,
                  attn_mask=None):
  """Runs the torch model on numpy inputs in our conventions (images NHWC, masks True = on).

  Images are cast to the model's float dtype (float64 after `model.double()`).
  Returns (encoder_out (B, S, D), hidden_states (depth + 1, B, S, D)) as numpy arrays.
  """
  import torch
  hidden = []
  layers = model.encoder.layers
  handles = [layers[0].register_forward_pre_hook(lambda m, args: hidden.append(args[0]))]
  for layer in layers:
    handles.append(layer.register_forward_hook(
        lambda m, args, out: hidden.append(out[0] if isinstance(out, tuple) else out)))
  kw = {}
  if text_ids is not None:
    kw['textual_tokens'] = torch.from_numpy(np.asarray(text_ids, np.int64))
  if text_padding_mask is not None:
    kw['text_padding_position'] = torch.from_numpy(np.asarray(text_padding_mask, bool))
  if images is not None:
    dtype = model.vision_embed.proj.weight.dtype
    kw['visual_tokens'] = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2)).to(dtype)
  if image_mask is not None:
    kw['vision_masked_position'] = torch.from_numpy(np.asarray(image_mask, np.int64))
  if attn_mask is not None:
    kw['attn_mask'] = torch.from_numpy(np.asarray(attn_mask, np.int64))  # never bool (quirk 1)
  try:
    with torch.no_grad():
      out = model(**kw)
  finally:
    for h in handles:
      h.remove()
  return (out['encoder_out'].numpy(),
          np.stack([h.detach().numpy() for h in hidden]))
