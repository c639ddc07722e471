"""Weights both ways between beit3_jax and PyTorch (torchscale `BEiT3`, unilm `beit3`).

One mapping table serves both directions. A Flax parameter path such as
`encoder/layers_3/self_attn/q_proj/A/kernel` is renamed to the torch key
`encoder.layers.3.self_attn.q_proj.A.weight` (`layers_i` -> `layers.i`, `/` -> `.`, and the
leaf names kernel/scale/embedding -> weight), and `_LAYOUT_RULES` says how the array changes:

| Flax leaf                                  | Flax shape    | torch shape   |
|--------------------------------------------|---------------|---------------|
| `.../{q,k,v}_proj/{A,B}/kernel`            | (D, H, d)     | (H*d, D)      |
| `.../out_proj/{A,B}/kernel`                | (H, d, D)     | (D, H*d)      |
| other `.../kernel` (fc1, fc2, heads)       | (in, out)     | (out, in)     |
| `vision_embed/proj/kernel`                 | (P, P, C, D)  | (D, C, P, P)  |
| `.../bias`                                 | any           | flattened     |
| everything else (norms, tables, tokens)    | same          | same          |

The unilm layout puts the backbone under `beit3.` (task and pretraining heads, added by later
modules, stay at the top level). Reading accepts either layout and a checkpoint wrapped in a
`model` or `module` key. Every missing, unexpected or mis-shaped key is reported by name in one
`ConversionError`; keys are skipped only when the caller names them (`skip=`), and are then
listed in the returned report.

CLI (reads and writes .safetensors and .pth; the Flax side is a params checkpoint directory,
see `beit3_jax.params_io`; any input or output may be a gs:// URL)::

    python -m beit3_jax.convert to-flax beit3_base_patch16_224.pth out/base --variant base
    python -m beit3_jax.convert to-torch out/base beit3_base.pth --layout unilm
    # unilm fine-tuned models with their heads (--task; to-torch writes the unilm layout back):
    python -m beit3_jax.convert to-flax beit3_base_patch16_480_vqa.pth out/vqa --variant base \
        --set img_size=480 --task vqa
    python -m beit3_jax.convert to-torch out/vqa vqa.pth
    # BEiT v2 VQ-KD visual tokenizers (mapping in beit3_jax/tokenizers/convert.py):
    python -m beit3_jax.convert to-flax vqkd_encoder_base_decoder_3x768x12_clip.pth out/vqkd \
        --model vqkd --variant base
    python -m beit3_jax.convert to-torch out/vqkd vqkd.pth
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from beit3_jax import param_tree, params_io, platforms, tasks
from beit3_jax.data import paths
from beit3_jax.models import abstract_params, count_params, get_config, layer_stack
from beit3_jax.tokenizers import convert as vqkd_convert
from beit3_jax.tokenizers import get_vqkd_config
from beit3_jax.torch_layout import (ConversionError, Report, mismatch_error, to_flax_layout,
                                    to_torch_layout, torch_layout_shape)
from beit3_jax.torch_layout import layout_kind as _layout_kind
from beit3_jax.torch_files import as_numpy, load_state_dict, save_state_dict, unwrap_state_dict

# (regex on the Flax path, layout kind). First match wins.
_LAYOUT_RULES: tuple[tuple[str, str], ...] = (
    (r'(^|/)out_proj(/[A-Z])?/kernel$', 'linear_in2'),
    (r'(^|/)vision_embed/proj/kernel$', 'conv'),
    (r'/kernel$', 'linear_in1'),
    (r'/bias$', 'flat'),
    (r'.*', 'same'),
)

UNILM_PREFIX = 'beit3.'
LAYOUTS = ('torchscale', 'unilm')


def layout_kind(flax_path: str) -> str:
  """The layout kind of a backbone's Flax path (the table above)."""
  return _layout_kind(flax_path, _LAYOUT_RULES)


def torch_key(flax_path: str) -> str:
  """The torchscale key of a '/'-joined Flax parameter path."""
  key = re.sub(r'(^|/)layers_(\d+)(?=/)', r'\1layers/\2', flax_path).replace('/', '.')
  return re.sub(r'\.(kernel|scale|embedding)$', '.weight', key)


def expected_torch_shapes(config, *, layout: str = 'torchscale') -> dict[str, tuple[int, ...]]:
  """torch key -> shape of every backbone tensor of a model config."""
  prefix = _prefix(layout)
  flat = param_tree.flatten(abstract_params(config, boxed=False))
  return {prefix + torch_key(p): torch_layout_shape(layout_kind(p), tuple(x.shape))
          for p, x in flat.items()}


def _prefix(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r}; expected one of {LAYOUTS}.')
  return UNILM_PREFIX if layout == 'unilm' else ''


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
  """A one-line guess of the model a backbone state dict belongs to (for error messages)."""
  sd = {k[len(UNILM_PREFIX):] if k.startswith(UNILM_PREFIX) else k: v
        for k, v in state_dict.items()}
  facts = []
  if 'text_embed.weight' in sd:
    vocab, width = np.shape(sd['text_embed.weight'])
    facts += [f'embed_dim={width}', f'vocab_size={vocab}']
  layers = {int(m.group(1)) for k in sd for m in [re.match(r'encoder\.layers\.(\d+)\.', k)] if m}
  if layers:
    facts.append(f'depth={max(layers) + 1}')
  if 'encoder.layers.0.ffn.A.fc1.weight' in sd:
    facts.append(f'mlp_dim={np.shape(sd["encoder.layers.0.ffn.A.fc1.weight"])[0]}')
  if 'vision_embed.proj.weight' in sd and 'encoder.embed_positions.A.weight' in sd:
    patch = np.shape(sd['vision_embed.proj.weight'])[-1]
    grid = math.isqrt(max(np.shape(sd['encoder.embed_positions.A.weight'])[0] - 3, 0))
    facts += [f'patch_size={patch}', f'img_size={grid * patch}']
  if 'encoder.embed_positions.B.weight' in sd:
    facts.append(f'max_text_positions={np.shape(sd["encoder.embed_positions.B.weight"])[0]}')
  facts.append(f'normalize_output={"encoder.layer_norm.A.weight" in sd}')
  return ', '.join(facts)


def _describe_config(config) -> str:
  return (f'variant={config.variant}, embed_dim={config.embed_dim}, depth={config.depth}, '
          f'mlp_dim={config.mlp_dim}, vocab_size={config.vocab_size}, '
          f'patch_size={config.patch_size}, img_size={config.img_size}, '
          f'max_text_positions={config.max_text_positions}, '
          f'normalize_output={config.normalize_output}')


def torch_to_flax(state_dict: Mapping[str, Any], config, *, skip: Sequence[str] = (),
                  report: Report | None = None) -> dict:
  """Backbone params (plain float32 numpy arrays, Flax layout) from a torch state dict.

  Args:
    state_dict: torchscale or unilm (`beit3.`-prefixed) keys -> tensors or arrays, optionally
      wrapped in a `model`/`module` key.
    config: the model config (`beit3_jax.models.get_config`).
    skip: regexes of keys to leave out on purpose (e.g. heads this model does not have); the
      skipped keys are appended to `report.skipped`.
    report: filled with what was converted and skipped.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key.
  """
  sd = unwrap_state_dict(state_dict)
  report = report if report is not None else Report()
  prefix = UNILM_PREFIX if any(k.startswith(UNILM_PREFIX) for k in sd) else ''
  # With the unilm layout, keys outside `beit3.` (heads) are not backbone keys.
  backbone = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  flat = param_tree.flatten(abstract_params(layer_stack.loop_config(config), boxed=False))
  out, missing, misshaped = {}, [], []
  for path, leaf in flat.items():
    kind = layout_kind(path)
    key = torch_key(path)
    if key not in backbone:
      missing.append(prefix + key)
      continue
    w = as_numpy(backbone[key])
    want = torch_layout_shape(kind, tuple(leaf.shape))
    if tuple(w.shape) != want:
      misshaped.append((prefix + key, tuple(w.shape), want))
      continue
    out[path] = to_flax_layout(kind, w, tuple(leaf.shape)).astype(np.float32)
  used = {prefix + torch_key(p) for p in flat}
  unexpected = []
  for k in sd:
    if k in used:
      continue
    if any(re.search(s, k) for s in skip):
      report.skipped.append(k)
    else:
      unexpected.append(k)
  if missing or unexpected or misshaped:
    raise mismatch_error('The state dict', missing, unexpected, misshaped,
                         _describe_config(config), describe_state_dict(backbone))
  report.converted = len(out)
  return layer_stack.to_layout(param_tree.unflatten(out), scan=layer_stack.scans(config),
                               num_vl_layers=config.num_vl_layers)


def flax_to_torch(params, config, *, layout: str = 'torchscale') -> dict[str, np.ndarray]:
  """torch state dict (numpy arrays, torch shapes) of backbone params.

  Args:
    params: the backbone's params (plain or boxed, on any device).
    config: its model config.
    layout: 'torchscale' (keys of torchscale's `BEiT3`) or 'unilm' (prefixed `beit3.`).

  Raises:
    ConversionError: the params tree does not match the config (every bad path listed).
  """
  prefix = _prefix(layout)
  flat = param_tree.flatten(layer_stack.to_layout(jax.device_get(nn.meta.unbox(params)),
                                                  scan=False))
  param_tree.check_fits(abstract_params(layer_stack.loop_config(config), boxed=False), flat,
                        'The params tree',
                        f'the model config ({_describe_config(config)})', error=ConversionError)
  return {prefix + torch_key(p): np.array(to_torch_layout(layout_kind(p), _float32(x)))
          for p, x in flat.items()}


def _float32(x) -> np.ndarray:
  """A host array, bfloat16 params (model.param_dtype) exported as float32 as torch holds them."""
  x = np.asarray(x)
  return x.astype(np.float32) if x.dtype != np.float32 and x.dtype.kind in 'fV' else x


def heads_to_torch(heads) -> dict[str, np.ndarray]:
  """torch tensors of the task / pretraining heads beside the backbone (unilm names).

  Mechanical: `<head>/.../kernel` (in, out) -> `<head>. ... .weight` (out, in);
  `scale` (LayerNorm) -> `weight`; other leaves (biases, `logit_scale`) keep name and shape.
  E.g. `mim_head/kernel` (D, 8192) -> `mim_head.weight` (8192, D).
  """
  out = {}
  for path, x in param_tree.flatten(jax.device_get(nn.meta.unbox(heads))).items():
    x = _float32(x)
    key = re.sub(r'(^|/)layers_(\d+)(?=/)', r'\1\2', path).replace('/', '.')
    if key.endswith('.kernel'):
      key, x = key[:-len('kernel')] + 'weight', np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    elif key.endswith('.scale'):
      key = key[:-len('scale')] + 'weight'
    out[key] = np.array(x)
  return out


def heads_to_flax(state_dict: Mapping[str, Any], abstract_heads) -> dict:
  """The inverse of `heads_to_torch` for the head leaves of `abstract_heads` (shapes)."""
  want = param_tree.flatten(abstract_heads)
  back = {}
  for path, leaf in want.items():
    key = re.sub(r'(^|/)layers_(\d+)(?=/)', r'\1\2', path).replace('/', '.')
    key = re.sub(r'\.(kernel|scale)$', '.weight', key)
    if key not in state_dict:
      raise ConversionError(f'The state dict has no {key} (for {path}).')
    w = as_numpy(state_dict[key])
    if path.endswith('/kernel'):
      w = np.ascontiguousarray(w.T).reshape(leaf.shape)
    if tuple(w.shape) != tuple(leaf.shape):
      raise ConversionError(f'{key}: shape {w.shape}, expected {tuple(leaf.shape)}.')
    back[path] = w
  return param_tree.unflatten(back)


def model_to_torch(params, config, *, layout: str = 'unilm') -> dict[str, np.ndarray]:
  """torch state dict of a model with heads ({'beit3': backbone, '<head>': ...}) or of a bare
  backbone. In the 'unilm' layout the heads keep their names beside `beit3.*` (unilm's
  `BEiT3Wrapper` subclasses); the 'torchscale' layout has no place for heads (ValueError)."""
  params = nn.meta.unbox(params)
  if 'beit3' not in params:
    return flax_to_torch(params, config, layout=layout)
  heads = {k: v for k, v in params.items() if k != 'beit3'}
  if heads and layout != 'unilm':
    raise ValueError(f'The params have heads {sorted(heads)}; torchscale\'s BEiT3 has no place '
                     'for them: export with layout unilm (--layout unilm).')
  return {**flax_to_torch(params['beit3'], config, layout=layout), **heads_to_torch(heads)}


def model_to_flax(state_dict: Mapping[str, Any], config, abstract_params) -> dict:
  """The inverse of `model_to_torch` ('unilm' layout): `beit3.*` -> the backbone, the other
  keys -> the heads of `abstract_params` (a model tree {'beit3': ..., '<head>': ...}).

  Raises ConversionError naming what does not fit (missing or mis-shaped keys; keys of neither
  the backbone nor a head)."""
  state_dict = unwrap_state_dict(state_dict)
  abstract = nn.meta.unbox(abstract_params)
  heads = {k: v for k, v in abstract.items() if k != 'beit3'}
  backbone = {k: v for k, v in state_dict.items() if k.startswith(UNILM_PREFIX)}
  rest = {k: v for k, v in state_dict.items() if not k.startswith(UNILM_PREFIX)}
  head_keys = set(heads_to_torch(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), heads)))
  unexpected = sorted(set(rest) - head_keys)
  if unexpected:
    raise ConversionError(f'Keys of neither the backbone nor the heads {sorted(heads)}: '
                          f'{unexpected[:12]}')
  return {'beit3': torch_to_flax(backbone, config), **heads_to_flax(rest, heads)}


# The unilm key of BEiT-3's pretraining heads; captioning's only head, mlm_head, is one of them,
# so a state dict with mim_head is a pretraining one whatever else it holds.
_PRETRAINING_KEY = 'mim_head.weight'


def guess_task(state_dict: Mapping[str, Any]) -> str | None:
  """The task whose head keys a unilm state dict holds (each task's `unilm_head_key`, see
  `beit3_jax.tasks`), 'pretraining' (BEiT-3 pretraining heads), or None (no head: a bare
  backbone)."""
  sd = unwrap_state_dict(state_dict)
  if _PRETRAINING_KEY in sd:
    return 'pretraining'
  for name in tasks.names():
    key = tasks.get(name).unilm_head_key
    if key and key in sd:
      return name
  return None


def head_sizes_of(task: str, state_dict: Mapping[str, Any]) -> dict[str, int]:
  """The head sizes of a unilm fine-tuned state dict of `task`, read off its head weights (the
  rows of each of the task's `unilm_head_sizes` keys, e.g. classification {'num_classes': rows
  of head.weight}). Raises ConversionError if a head weight is not there."""
  sd = unwrap_state_dict(state_dict)
  sizes = {}
  for name, key in tasks.get(task).unilm_head_sizes.items():
    if key not in sd or len(np.shape(sd[key])) != 2:
      guess = guess_task(sd)
      hint = f'; it looks like a {guess} checkpoint' if guess else ''
      raise ConversionError(f'A {task} state dict has a 2-D {key} (the head, whose rows are the '
                            f'{name.split("_")[1]}); this one has none{hint}.')
    sizes[name] = int(np.shape(sd[key])[0])
  return sizes


def task_to_flax(state_dict: Mapping[str, Any], task: str, config,
                 report: Report | None = None) -> tuple[dict, dict[str, int]]:
  """(params, head sizes) of a unilm fine-tuned state dict: the backbone under `beit3.` and the
  head keys of `task` beside it (the task's model, `beit3_jax.tasks`).

  Args:
    state_dict: unilm keys -> tensors or arrays, optionally wrapped in `model` / `module`.
    task: a registered task's name (`beit3_jax.tasks`).
    config: the backbone's model config.
    report: filled with the number of tensors converted.

  Returns:
    params: the task model's tree {'beit3': ..., <head params>}, float32 numpy, Flax layout.
    head sizes: {'num_classes': C} / {'num_answers': A} / {} (from the head weights' shapes).

  Raises:
    ConversionError: keys not in the unilm layout, or not those of `task`'s model (the message
      names the task the keys look like when it is another one).
  """
  spec = tasks.get(task)
  sd = unwrap_state_dict(state_dict)
  if not any(k.startswith(UNILM_PREFIX) for k in sd):
    raise ConversionError(f'--task {task} reads the unilm layout (the backbone under '
                          f'{UNILM_PREFIX!r}, the head beside it); these keys have no '
                          f'{UNILM_PREFIX!r} prefix (a torchscale backbone has no head).')
  guess = guess_task(sd)
  if guess != task:
    what = f'a {guess} checkpoint' if guess else 'a bare backbone (no head keys)'
    raise ConversionError(f'The state dict looks like {what}, not {task}'
                          + (f': convert it with --task {guess}.' if guess in tasks.names()
                             else '.'))
  head_sizes = head_sizes_of(task, sd)
  abstract = spec.abstract_params(config, head_sizes)
  params = model_to_flax(sd, config, abstract)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  if report is not None:
    report.converted = len(param_tree.flatten(params))
  return params, head_sizes


# ----------------------------------------------------------------------------- CLI


def _parse_overrides(items: Sequence[str]) -> dict:
  out = {}
  for item in items:
    if '=' not in item:
      raise SystemExit(f'--set expects FIELD=VALUE, got {item!r}.')
    k, v = item.split('=', 1)
    try:
      out[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k] = v
  return out


def _model_config(args, fallback_dir: str | None = None):
  make = get_vqkd_config if args.model == 'vqkd' else get_config
  overrides = _parse_overrides(args.set)
  if args.variant and args.config:
    raise SystemExit('Give --variant or --config, not both.')
  if args.variant:
    return make(args.variant, **overrides)
  source = args.config or fallback_dir
  if source is None:
    raise SystemExit('Say which model this is: --variant base|large|giant|small, or --config '
                     '(a config file or a training workdir).')
  config = params_io.load_model_config(source)
  if overrides:
    fields = {k: v for k, v in config.to_dict().items() if k != 'variant'}
    config = make(config.variant, **{**fields, **overrides})
  return config


def _describe(model: str, config) -> str:
  if model == 'vqkd':
    return ', '.join(f'{k}={v}' for k, v in sorted(config.to_dict().items()) if k != 'variant')
  return _describe_config(config)


_FINAL_NORM_KEY = UNILM_PREFIX + 'encoder.layer_norm.A.weight'


def _infer_normalize_output(args, state_dict) -> None:
  """unilm's classification and VQA models drop the backbone's final norm: with --task, a state
  dict without it converts with normalize_output=False unless --set says otherwise."""
  given = {item.split('=', 1)[0] for item in args.set}
  unilm = any(k.startswith(UNILM_PREFIX) for k in state_dict)
  if unilm and 'normalize_output' not in given and _FINAL_NORM_KEY not in state_dict:
    args.set = [*args.set, 'normalize_output=False']
    print(f'normalize_output=False: the state dict has no {_FINAL_NORM_KEY}.')


def _task_hint(state_dict) -> str:
  guess = guess_task(state_dict)
  if guess in tasks.names():
    return (f'\nIt looks like a unilm {guess} checkpoint: convert it with --task {guess} to keep '
            'its head, or leave the head keys out with --skip to keep only the backbone.')
  return ''


def _shown(path: str) -> str:
  """`path` as printed: a URL as given, a local path absolute."""
  return str(path) if paths.is_remote(path) else os.path.abspath(path)


def main(argv: Sequence[str] | None = None) -> int:
  platforms.cpu_unless_accelerators()
  parser = argparse.ArgumentParser(prog='python -m beit3_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  for name, help_ in (('to-flax', 'torch .pth/.safetensors -> Flax params checkpoint dir'),
                      ('to-torch', 'Flax params checkpoint dir -> torch .pth/.safetensors')):
    p = sub.add_parser(name, help=help_)
    p.add_argument('input')
    p.add_argument('output')
    p.add_argument('--model', choices=('beit3', 'vqkd'), default=None,
                   help='the BEiT-3 backbone (default) or a BEiT v2 VQ-KD visual tokenizer; '
                   'to-torch reads it from the checkpoint')
    p.add_argument('--variant', help='model variant (beit3: base, large, giant, small; '
                   'vqkd: base, large, ...)')
    p.add_argument('--config', help='a config file (its .model is used if present) or a '
                   'directory holding config.json (training workdir or params checkpoint)')
    p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                   help='override a model config field, e.g. --set img_size=384')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output')
    if name == 'to-flax':
      p.add_argument('--skip', action='append', default=[], metavar='REGEX',
                     help='leave out matching keys on purpose (they are listed)')
      p.add_argument('--task', choices=tasks.names(), default=None,
                     help='a unilm fine-tuned checkpoint: keep its head (sizes read off the '
                     'head weights; normalize_output=False when it has no final encoder norm)')
    else:
      p.add_argument('--layout', choices=LAYOUTS, default=None,
                     help="'unilm' prefixes the backbone with beit3. and wraps it in 'model' "
                     "(default: torchscale; unilm for a model with a task head)")
  args = parser.parse_args(argv)
  training = args.command == 'to-torch' and params_io.is_training_checkpoint(args.input)
  if training and args.model is None:
    step_dir = params_io.find_step_dir(args.input)
    run_dir = params_io.training_run_dir(step_dir)
    args.config = args.config or str(run_dir)
    job = json.loads((run_dir / params_io.CONFIG_FILE).read_text()).get('job')
    args.model = 'vqkd' if job == 'tokenizer' else 'beit3'
  if args.command == 'to-torch' and args.model is None:
    args.model = params_io.read_kind(args.config or args.input)
  args.model = args.model or 'beit3'
  if args.command == 'to-flax':
    task, head_sizes = getattr(args, 'task', None), None
    if task is not None and args.model != 'beit3':
      raise SystemExit(f'--task {task} is for BEiT-3 models, not --model {args.model}.')
    if task is not None and args.skip:
      raise SystemExit('--skip does not apply with --task (the head keys are converted).')
    state = load_state_dict(args.input) if task is not None else None
    if task is not None:
      _infer_normalize_output(args, state)
    config = _model_config(args)
    print(f'Reading {args.input} as {config.variant} ({args.model}): '
          f'{_describe(args.model, config)}')
    report = Report()
    state = state if state is not None else load_state_dict(args.input)
    if args.model == 'vqkd':
      params, vq_stats = vqkd_convert.vqkd_torch_to_flax(state, config, report=report)
      extra = {'vq_stats': vq_stats}
    elif task is not None:
      (params, head_sizes), extra = task_to_flax(state, task, config, report=report), None
    else:
      try:
        params, extra = torch_to_flax(state, config, skip=args.skip, report=report), None
      except ConversionError as e:
        raise ConversionError(str(e) + _task_hint(state)) from None
    sizes = ''.join(f', {k}={v}' for k, v in (head_sizes or {}).items())
    print(f'Converted {report.converted} tensors, {count_params(params):,} parameters'
          + (f' ({task} model{sizes}).' if task else '.'))
    if report.skipped:
      print(f'Skipped on request ({len(report.skipped)}): {", ".join(report.skipped)}')
    params_io.save_params(args.output, params, config, overwrite=args.overwrite,
                          kind=args.model, extra=extra, task=task, head_sizes=head_sizes)
    print(f'Wrote the Flax params checkpoint to {_shown(args.output)}')
  else:
    config = _model_config(args, fallback_dir=args.input)
    task = None if training or args.model != 'beit3' else params_io.read_task(args.input)[0]
    if args.layout is None:
      args.layout = 'unilm' if task is not None else 'torchscale'
    if training:
      params, step_dir = params_io.load_training_params(args.input)
      print(f'Reading the params of training checkpoint {step_dir}')
    if training and args.model == 'vqkd':
      stats = params_io.load_training_params(step_dir, 'extra')[0]['vq_stats']
      sd = vqkd_convert.vqkd_flax_to_torch(params, stats, config)
    elif training:
      sd = model_to_torch(params, config, layout=args.layout)
    elif args.model == 'vqkd':
      params, vq_stats, _ = params_io.load_vqkd_params(args.input, config)
      sd = vqkd_convert.vqkd_flax_to_torch(params, vq_stats, config)
    elif task is not None:
      params = params_io.load_params(args.input, config)
      sd = model_to_torch(params, config, layout=args.layout)
    else:
      params = params_io.load_params(args.input, config)
      sd = flax_to_torch(params, config, layout=args.layout)
    print(f'Read {args.input} as {config.variant} ({args.model}): {_describe(args.model, config)}; '
          f'{count_params(params):,} parameters.')
    save_state_dict(sd, args.output, wrap_model=args.layout == 'unilm', overwrite=args.overwrite)
    print(f'Wrote {len(sd)} tensors ({args.layout} layout) to {_shown(args.output)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
