"""Weights both ways between the Flax VQ-KD tokenizer and BEiT v2's PyTorch `VQKD`.

One mapping table serves both directions (the same scheme as the backbone's
`beit3_jax.convert`). A Flax path is renamed to its torch key by `blocks_i` -> `blocks.i`,
`layers_i` -> `i` (torch `nn.Sequential` indices), `/` -> `.` and the leaf names
kernel/scale/embedding -> weight; `_LAYOUT_RULES` says how the array changes:

| Flax leaf                              | Flax shape    | torch shape    |
|----------------------------------------|---------------|----------------|
| `.../attn/qkv/kernel`                  | (D, 3, H, d)  | (3*H*d, D)     |
| `.../attn/proj/kernel`                 | (H, d, D)     | (D, H*d)       |
| other `.../kernel` (fc1, fc2, tasks)   | (in, out)     | (out, in)      |
| `.../patch_embed/proj/kernel`          | (P, P, C, D)  | (D, C, P, P)   |
| `.../bias`, `q_bias`, `v_bias`         | any           | flattened      |
| everything else (norms, tokens, tables, codebook, vq_stats) | same | same |

Params and the 'vq_stats' collection share one key space: `quantize/embedding/embedding`
(params) <-> `quantize.embedding.weight`, `quantize/embedding/{cluster_size,embed_avg,initted}`
and `quantize/cluster_size` (vq_stats) <-> the torch buffers of the same names.

A tokenizer checkpoint also holds its training teacher (`teacher_model.*`), the teacher's input
scaling (`scaling_layer.*`) and possibly loss modules: keys starting with `teacher`, `scaling`
or `loss` are skipped, as beit2 does when it loads a tokenizer, and listed in the report.
Every other key must match: every missing, unexpected or mis-shaped key is reported by name in
one `ConversionError`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from beit3_jax import param_tree
from beit3_jax.torch_files import as_numpy, load_state_dict, save_state_dict, unwrap_state_dict
from beit3_jax.torch_layout import (ConversionError, Report, layout_kind, mismatch_error,
                                    to_flax_layout, to_torch_layout, torch_layout_shape)
from beit3_jax.tokenizers.vqkd import abstract_variables

# torch key prefixes that are not part of the tokenizer (beit2 drops them as well).
SKIPPED_PREFIXES = ('teacher', 'scaling', 'loss')

# (regex on the Flax path, layout kind). First match wins. Kinds as in beit3_jax.convert.
_LAYOUT_RULES: tuple[tuple[str, str], ...] = (
    (r'(^|/)attn/proj/kernel$', 'linear_in2'),
    (r'(^|/)patch_embed/proj/kernel$', 'conv'),
    (r'/kernel$', 'linear_in1'),
    (r'(^|/)(q_|v_)?bias$', 'flat'),
    (r'.*', 'same'),
)


def torch_key(flax_path: str) -> str:
  """The torch key of a '/'-joined Flax path of the tokenizer (params or vq_stats)."""
  key = re.sub(r'(^|/)blocks_(\d+)(?=/)', r'\1blocks/\2', flax_path)
  key = re.sub(r'(^|/)layers_(\d+)(?=/)', r'\1\2', key).replace('/', '.')
  return re.sub(r'\.(kernel|scale|embedding)$', '.weight', key)


def _expected(config) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Flax path -> (collection, Flax shape) of every tensor of the tokenizer."""
  params, vq_stats = abstract_variables(config)
  out = {}
  for collection, tree in (('params', params), ('vq_stats', vq_stats)):
    for path, leaf in param_tree.flatten(tree).items():
      out[path] = (collection, tuple(leaf.shape))
  return out


def expected_torch_shapes(config) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of every tensor of a tokenizer config (the layout of beit2's
  `VQKD.state_dict()`)."""
  return {torch_key(p): torch_layout_shape(layout_kind(p, _LAYOUT_RULES), shape)
          for p, (_, shape) in _expected(config).items()}


def describe_vqkd_state_dict(state_dict: Mapping[str, Any]) -> str:
  """A one-line guess of the tokenizer config a state dict belongs to (for error messages)."""
  facts = []
  for part in ('encoder', 'decoder'):
    blocks = {int(m.group(1)) for k in state_dict
              for m in [re.match(rf'{part}\.blocks\.(\d+)\.', k)] if m}
    if blocks:
      facts.append(f'{part} depth={max(blocks) + 1}')
    if f'{part}.pos_embed' in state_dict:
      _, rows, width = np.shape(state_dict[f'{part}.pos_embed'])
      facts.append(f'{part} width={width}, grid={math.isqrt(rows - 1)}')
  if 'encoder.patch_embed.proj.weight' in state_dict:
    facts.append(f'patch_size={np.shape(state_dict["encoder.patch_embed.proj.weight"])[-1]}')
  if 'quantize.embedding.weight' in state_dict:
    n, c = np.shape(state_dict['quantize.embedding.weight'])
    facts.append(f'n_embed={n}, code_dim={c}')
  if 'decode_task_layer.2.weight' in state_dict:
    facts.append(f'decoder_out_dim={np.shape(state_dict["decode_task_layer.2.weight"])[0]}')
  return ', '.join(facts) or 'no tokenizer keys'


def _describe_config(config) -> str:
  return (f'variant={config.variant}, img_size={config.img_size}, '
          f'patch_size={config.patch_size}, embed_dim={config.embed_dim}, depth={config.depth}, '
          f'decoder_embed_dim={config.decoder_embed_dim}, decoder_depth={config.decoder_depth}, '
          f'n_embed={config.n_embed}, code_dim={config.code_dim}, '
          f'decoder_out_dim={config.decoder_out_dim}')


def vqkd_torch_to_flax(state_dict: Mapping[str, Any], config,
                       report: Report | None = None) -> tuple[dict, dict]:
  """Tokenizer (params, vq_stats), plain float32 numpy trees, from a torch state dict.

  Args:
    state_dict: the keys of beit2's `VQKD.state_dict()` -> tensors or arrays, optionally
      wrapped in 'model', 'module' or 'state_dict'.
    config: the tokenizer config (`get_vqkd_config`).
    report: filled with the number of converted tensors and the skipped keys (`teacher*`,
      `scaling*`, `loss*`).

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  sd = unwrap_state_dict(state_dict)
  report = report if report is not None else Report()
  out: dict[str, dict] = {'params': {}, 'vq_stats': {}}
  missing, misshaped, used = [], [], set()
  for path, (collection, shape) in _expected(config).items():
    kind, key = layout_kind(path, _LAYOUT_RULES), torch_key(path)
    used.add(key)
    if key not in sd:
      missing.append(key)
      continue
    w = as_numpy(sd[key])
    want = torch_layout_shape(kind, shape)
    if tuple(w.shape) != want:
      misshaped.append((key, tuple(w.shape), want))
      continue
    out[collection][path] = to_flax_layout(kind, w, shape).astype(np.float32)
  unexpected = []
  for k in sd:
    if k in used:
      continue
    if k.startswith(SKIPPED_PREFIXES):
      report.skipped.append(k)
    else:
      unexpected.append(k)
  if missing or unexpected or misshaped:
    raise mismatch_error('The state dict', missing, unexpected, misshaped,
                         _describe_config(config), describe_vqkd_state_dict(sd))
  report.converted = len(out['params']) + len(out['vq_stats'])
  return param_tree.unflatten(out['params']), param_tree.unflatten(out['vq_stats'])


def vqkd_flax_to_torch(params, vq_stats, config) -> dict[str, np.ndarray]:
  """torch state dict (numpy arrays, beit2's keys and shapes) of tokenizer variables.

  Args:
    params: the tokenizer's params (plain or boxed, on any device).
    vq_stats: its 'vq_stats' collection.
    config: its tokenizer config.

  Raises:
    ConversionError: the trees do not match the config (every bad path listed).
  """
  flat = {}
  for tree in (params, vq_stats):
    flat.update(param_tree.flatten(jax.device_get(nn.meta.unbox(tree))))
  want = {p: np.empty(shape, np.bool_) for p, (_, shape) in _expected(config).items()}
  param_tree.check_fits(want, flat, 'The params/vq_stats trees',
                        f'the model config ({_describe_config(config)})', error=ConversionError)
  return {torch_key(p): np.array(to_torch_layout(layout_kind(p, _LAYOUT_RULES), np.asarray(x)))
          for p, x in flat.items()}


def load_vqkd_torch(path: str, config, report: Report | None = None) -> tuple[dict, dict]:
  """(params, vq_stats) from a .pth/.safetensors tokenizer checkpoint (see vqkd_torch_to_flax).

  The file is read by `beit3_jax.torch_files.load_state_dict` (a .pth wrapped in 'model' or
  'module', read with weights_only=True). For a Flax params directory use
  `beit3_jax.params_io.load_vqkd_params`.
  """
  return vqkd_torch_to_flax(load_state_dict(path), config, report)


def save_vqkd_torch(path: str, params, vq_stats, config, *, overwrite: bool = False) -> None:
  """Writes the tokenizer as a torch state dict (.pth wrapped in 'model' like beit2)."""
  save_state_dict(vqkd_flax_to_torch(params, vq_stats, config), path,
                  wrap_model=path.endswith(('.pth', '.pt', '.bin')), overwrite=overwrite)
