"""CLIP vision weights -> the Flax `ClipVisionTower` tree, and the teacher params directory.

Two source layouts are read:

* OpenAI's release (`ViT-B-16.pt`, a TorchScript archive, read without running its code by
  `torch_files.load_torchscript_state_dict`; or a plain state dict of the same keys):
  `visual.conv1.weight`, `visual.class_embedding`, `visual.positional_embedding`,
  `visual.ln_pre.*`, `visual.transformer.resblocks.{i}.{attn.in_proj_weight, attn.in_proj_bias,
  attn.out_proj.*, ln_1.*, mlp.c_fc.*, mlp.c_proj.*, ln_2.*}`, `visual.ln_post.*`,
  `visual.proj`. The text tower's keys (everything not under `visual.`) are skipped.
* transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel`
  (.safetensors or pytorch .bin; keys with or without the `vision_model.` prefix):
  `embeddings.patch_embedding.weight`, `embeddings.class_embedding`,
  `embeddings.position_embedding.weight`, `pre_layrnorm.*`,
  `encoder.layers.{i}.{self_attn.{q,k,v,out}_proj.*, layer_norm1.*, mlp.fc1.*, mlp.fc2.*,
  layer_norm2.*}`, `post_layernorm.*` and, when present, `visual_projection.weight` (E, D)
  (= OpenAI's `proj` transposed). q, k and v are stacked into OpenAI's `in_proj` (rows q, k, v).
  Text keys, `logit_scale` and `position_ids` buffers are skipped.

The architecture is read off the shapes (width, layers, patch, image size, MLP width,
projection); the number of heads is not in the weights: OpenAI's rule width // 64 unless given
(a transformers directory's config.json gives it, with its eps and activation).

The teacher params directory (what `teacher.path` of a `teacher.kind='clip'` tokenizer run
names) has the layout of `beit3_jax.params_io`: `config.json` (the tower config plus
"kind": "clip") and `params/` (an Orbax StandardCheckpointer tree of float32 arrays).

CLI:
    python -m beit3_jax.tokenizers.clip_convert SOURCE OUTPUT [--num-heads H] [--overwrite]
SOURCE: OpenAI's ViT-B-16.pt, a transformers .safetensors/.bin file or model directory.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from beit3_jax import param_tree
from beit3_jax.torch_files import (TorchScriptError, as_numpy, is_torchscript_archive,
                                   load_state_dict, load_torchscript_state_dict)
from beit3_jax.torch_layout import (ConversionError, Report, layout_kind, mismatch_error,
                                    to_flax_layout, torch_layout_shape)
from beit3_jax.tokenizers.clip import abstract_params, get_clip_config

KIND = 'clip'
CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'
_HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')

# (regex on the Flax path, layout kind), first match wins (kinds of `beit3_jax.torch_layout`).
_LAYOUT_RULES: tuple[tuple[str, str], ...] = (
    (r'^conv1/kernel$', 'conv'),
    (r'/out_proj/kernel$', 'linear_in2'),
    (r'/kernel$', 'linear_in1'),            # qkv (D, 3, H, d) <- in_proj_weight (3 D, D); mlp
    (r'/qkv/bias$', 'flat'),
    (r'.*', 'same'),                        # norms, embeddings, out_proj/mlp biases, proj (D, E)
)


def openai_key(flax_path: str) -> str:
  """OpenAI's state-dict key (without `visual.`) of a '/'-joined Flax path of the tower."""
  key = re.sub(r'(^|/)resblocks_(\d+)(?=/)', r'\1resblocks/\2', flax_path).replace('/', '.')
  key = key.replace('attn.qkv.kernel', 'attn.in_proj_weight')
  key = key.replace('attn.qkv.bias', 'attn.in_proj_bias')
  return re.sub(r'\.(kernel|scale)$', '.weight', key)


# ----------------------------------------------------------------------------- layouts


_HF_RENAMES = (
    (r'^embeddings\.patch_embedding\.weight$', 'conv1.weight'),
    (r'^embeddings\.class_embedding$', 'class_embedding'),
    (r'^embeddings\.position_embedding\.weight$', 'positional_embedding'),
    (r'^pre_layrnorm\.', 'ln_pre.'),
    (r'^post_layernorm\.', 'ln_post.'),
    (r'^encoder\.layers\.(\d+)\.self_attn\.out_proj\.', r'transformer.resblocks.\1.attn.out_proj.'),
    (r'^encoder\.layers\.(\d+)\.layer_norm1\.', r'transformer.resblocks.\1.ln_1.'),
    (r'^encoder\.layers\.(\d+)\.layer_norm2\.', r'transformer.resblocks.\1.ln_2.'),
    (r'^encoder\.layers\.(\d+)\.mlp\.fc1\.', r'transformer.resblocks.\1.mlp.c_fc.'),
    (r'^encoder\.layers\.(\d+)\.mlp\.fc2\.', r'transformer.resblocks.\1.mlp.c_proj.'),
)
_HF_SKIPPED = re.compile(r'^(text_model\.|text_projection\.|logit_scale$)|position_ids$')
_HF_QKV = re.compile(r'^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$')


def _hf_to_openai(sd: Mapping[str, np.ndarray], report: Report) -> dict[str, np.ndarray]:
  """A transformers CLIP vision state dict in OpenAI's key layout (without `visual.`)."""
  out, qkv, unknown = {}, {}, []
  for key, value in sd.items():
    bare = key[len('vision_model.'):] if key.startswith('vision_model.') else key
    if _HF_SKIPPED.search(bare):
      report.skipped.append(key)
      continue
    if bare == 'visual_projection.weight':
      out['proj'] = np.ascontiguousarray(value.T)
      continue
    m = _HF_QKV.match(bare)
    if m:
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
      continue
    for pattern, repl in _HF_RENAMES:
      if re.search(pattern, bare):
        out[re.sub(pattern, repl, bare)] = value
        break
    else:
      unknown.append(key)
  for (layer, leaf), parts in sorted(qkv.items()):
    if set(parts) != {'q', 'k', 'v'}:
      unknown.extend(f'encoder.layers.{layer}.self_attn.{t}_proj.{leaf}' for t in parts)
      continue
    name = 'in_proj_weight' if leaf == 'weight' else 'in_proj_bias'
    out[f'transformer.resblocks.{layer}.attn.{name}'] = np.concatenate(
        [parts['q'], parts['k'], parts['v']], axis=0)
  if unknown:
    raise ConversionError(f'Not keys of a transformers CLIP vision model: {sorted(unknown)}.')
  return out


def _openai_visual(sd: Mapping[str, np.ndarray], report: Report) -> dict[str, np.ndarray]:
  """The `visual.*` tensors of an OpenAI CLIP state dict, the prefix dropped."""
  out = {}
  for key, value in sd.items():
    if key.startswith('visual.'):
      out[key[len('visual.'):]] = value
    else:
      report.skipped.append(key)
  return out


def _layout(sd: Mapping[str, Any]) -> str:
  if any(k.startswith('visual.') for k in sd):
    return 'openai'
  if any(k.split('vision_model.', 1)[-1].startswith('embeddings.patch_embedding') for k in sd):
    return 'transformers'
  sample = sorted(sd)[:5]
  raise ConversionError('Not a CLIP vision state dict: expected OpenAI keys (visual.conv1.weight, '
                        '...) or transformers keys ([vision_model.]embeddings.patch_embedding.'
                        f'weight, ...); its first keys are {sample}.')


def openai_visual_state_dict(state_dict: Mapping[str, Any],
                             report: Report | None = None) -> dict[str, np.ndarray]:
  """The vision tower's tensors in OpenAI's layout (keys without `visual.`), float32, from an
  OpenAI or a transformers CLIP state dict (see the module docstring). Skipped keys (text
  tower, logit scale, position_ids) go to `report.skipped`."""
  report = report if report is not None else Report()
  sd = {k: as_numpy(v) for k, v in state_dict.items() if hasattr(v, 'shape')}
  visual = (_openai_visual if _layout(sd) == 'openai' else _hf_to_openai)(sd, report)
  return {k: np.asarray(v, np.float32) for k, v in visual.items()}


# ----------------------------------------------------------------------------- conversion


def infer_clip_config(visual: Mapping[str, np.ndarray], **overrides):
  """The tower config the shapes of an OpenAI-layout visual state dict imply.

  heads defaults to width // 64 (OpenAI's `build_model`); `overrides` (e.g. heads, eps,
  activation) win over what the shapes say, and are checked against them on conversion.
  """
  need = ('conv1.weight', 'positional_embedding', 'transformer.resblocks.0.mlp.c_fc.weight')
  missing = [k for k in need if k not in visual]
  if missing:
    raise ConversionError(f'Cannot read the CLIP tower\'s size: no {missing} (have '
                          f'{sorted(visual)[:8]}...).')
  width, _, patch, _ = np.shape(visual['conv1.weight'])
  rows = np.shape(visual['positional_embedding'])[0]
  grid = math.isqrt(rows - 1)
  if grid * grid != rows - 1:
    raise ConversionError(f'positional_embedding has {rows} rows: not 1 + a square grid.')
  layers = len({m.group(1) for k in visual
                for m in [re.match(r'transformer\.resblocks\.(\d+)\.', k)] if m})
  fields = dict(image_size=int(patch * grid), patch_size=int(patch), width=int(width),
                layers=layers, heads=max(int(width) // 64, 1),
                mlp_dim=int(np.shape(visual['transformer.resblocks.0.mlp.c_fc.weight'])[0]),
                projection_dim=int(np.shape(visual['proj'])[1]) if 'proj' in visual else 0)
  fields.update(overrides)
  return get_clip_config('vit_b16', **fields)


def _describe(config) -> str:
  return ', '.join(f'{k}={config[k]}' for k in ('image_size', 'patch_size', 'width', 'layers',
                                                  'heads', 'mlp_dim', 'projection_dim'))


def clip_torch_to_flax(state_dict: Mapping[str, Any], config=None,
                       report: Report | None = None, **overrides) -> tuple[dict, Any]:
  """(params, config) of the Flax tower from an OpenAI or transformers CLIP state dict.

  Args:
    state_dict: key -> tensor or array (see the module docstring for both layouts).
    config: the tower config the weights must fit; None -> read off the shapes
      (`infer_clip_config` with `overrides`).
    report: gets the number of converted tensors and the skipped keys.

  Returns:
    (params: a plain tree of float32 numpy arrays, config).

  Raises:
    ConversionError: every missing, unexpected and mis-shaped key, by its OpenAI name.
  """
  report = report if report is not None else Report()
  visual = openai_visual_state_dict(state_dict, report)
  config = config if config is not None else infer_clip_config(visual, **overrides)
  flat, missing, misshaped, used = {}, [], [], set()
  for path, leaf in param_tree.flatten(abstract_params(config)).items():
    kind, key = layout_kind(path, _LAYOUT_RULES), openai_key(path)
    used.add(key)
    if key not in visual:
      missing.append(f'visual.{key}')
      continue
    want = torch_layout_shape(kind, tuple(leaf.shape))
    if tuple(visual[key].shape) != want:
      misshaped.append((f'visual.{key}', tuple(visual[key].shape), want))
      continue
    flat[path] = to_flax_layout(kind, visual[key], tuple(leaf.shape)).astype(np.float32)
  unexpected = [f'visual.{k}' for k in visual if k not in used]
  if missing or unexpected or misshaped:
    raise mismatch_error('The CLIP state dict', missing, unexpected, misshaped,
                         _describe(config))
  report.converted = len(flat)
  return param_tree.unflatten(flat), config


# ----------------------------------------------------------------------------- files


def _hf_config_fields(config_file: epath.Path) -> dict[str, Any]:
  """Tower config overrides from a transformers config.json (CLIPConfig or CLIPVisionConfig)."""
  fields = json.loads(config_file.read_text())
  vision = fields.get('vision_config', fields)
  out = {}
  if 'num_attention_heads' in vision:
    out['heads'] = int(vision['num_attention_heads'])
  if 'layer_norm_eps' in vision:
    out['layernorm_eps'] = float(vision['layer_norm_eps'])
  act = vision.get('hidden_act')
  if act is not None:
    if act not in ('quick_gelu', 'gelu'):
      raise ValueError(f'{config_file}: hidden_act={act!r}; the CLIP tower supports quick_gelu '
                       'and gelu.')
    out['activation'] = act
  return out


def load_clip_torch(source: str, report: Report | None = None, **overrides) -> tuple[dict, Any]:
  """(params, config) of a CLIP checkpoint: OpenAI's TorchScript `ViT-B-16.pt` (or a state dict
  file of its keys), a transformers .safetensors / .bin, or a transformers model directory (its
  config.json supplies heads, eps and activation; `overrides` win)."""
  path = epath.Path(source)
  if path.is_dir():
    files = [path / f for f in _HF_WEIGHT_FILES if (path / f).exists()]
    if not files:
      raise FileNotFoundError(f'{source}: a directory without {" or ".join(_HF_WEIGHT_FILES)} '
                              '(sharded checkpoints are not read; pass one weights file).')
    fields = _hf_config_fields(path / 'config.json') if (path / 'config.json').exists() else {}
    return load_clip_torch(str(files[0]), report, **{**fields, **overrides})
  if not path.exists():
    raise FileNotFoundError(f'No CLIP checkpoint at {source}.')
  source = str(source)
  state_dict = None
  if source.endswith(('.pt', '.pth')):   # OpenAI's release is a TorchScript archive
    if '://' in source:
      try:
        state_dict = load_torchscript_state_dict(source)
      except TorchScriptError:
        pass
    elif is_torchscript_archive(source):
      state_dict = load_torchscript_state_dict(source)
  if state_dict is None:
    state_dict = load_state_dict(source)
  return clip_torch_to_flax(state_dict, report=report, **overrides)


def _checkpoint_path(directory) -> epath.Path:
  path = epath.Path(directory)
  return path if '://' in str(path) else path.absolute()


def save_clip_params(directory, params, config, *, overwrite: bool = False) -> epath.Path:
  """Writes a teacher params directory (config.json with "kind": "clip", params/); returns it.

  Raises FileExistsError if the directory exists and is not empty, unless `overwrite`.
  """
  import orbax.checkpoint as ocp
  path = _checkpoint_path(directory)
  if path.exists() and any(path.iterdir()):
    if not overwrite:
      raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True (--overwrite) '
                            'to replace it.')
    path.rmtree()
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps({'kind': KIND, **config.to_dict()}, indent=2,
                                             sort_keys=True))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / PARAMS_DIR, jax.tree.map(np.asarray, jax.device_get(params)))
  return path


def load_clip_config(directory):
  """The tower config of a teacher params directory written by `save_clip_params`."""
  config_file = epath.Path(directory) / CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f'{directory}: no {CONFIG_FILE}; write a CLIP teacher directory with '
                            'python -m beit3_jax.tokenizers.clip_convert SOURCE OUTPUT.')
  fields = json.loads(config_file.read_text())
  kind = fields.pop('kind', 'beit3')
  if kind != KIND:
    raise ValueError(f'{directory} holds a {kind} model, not a CLIP vision tower (convert one '
                     'with python -m beit3_jax.tokenizers.clip_convert).')
  variant = fields.pop('variant', 'vit_b16')
  try:
    return get_clip_config(variant, **fields)
  except (KeyError, ValueError) as e:
    raise ValueError(f'{config_file}: not a valid CLIP tower config: {e}') from e


def load_clip_params(directory, config=None) -> tuple[Any, Any]:
  """(params, config) of a teacher params directory, every array checked against the config
  (default: the directory's own)."""
  import orbax.checkpoint as ocp
  path = _checkpoint_path(directory)
  config = config if config is not None else load_clip_config(path)
  if not (path / PARAMS_DIR).exists():
    raise FileNotFoundError(f'{path}: no {PARAMS_DIR}/ (write one with python -m '
                            'beit3_jax.tokenizers.clip_convert).')
  want = abstract_params(config)
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.metadata(path / PARAMS_DIR).item_metadata.tree
    stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), stored)
    param_tree.check_fits(want, stored, f'The arrays in {path / PARAMS_DIR}',
                          f'the CLIP config ({_describe(config)})', error=ValueError,
                          verb='do not fit')
    return checkpointer.restore(path / PARAMS_DIR, want), config


def convert(source: str, output: str, *, overwrite: bool = False, **overrides) -> epath.Path:
  """Converts a CLIP checkpoint (see `load_clip_torch`) into a teacher params directory."""
  report = Report()
  params, config = load_clip_torch(source, report, **overrides)
  path = save_clip_params(output, params, config, overwrite=overwrite)
  print(f'Converted {report.converted} tensors of {source} ({_describe(config)}); skipped '
        f'{len(report.skipped)} non-vision keys. Wrote {path}.')
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m beit3_jax.tokenizers.clip_convert',
      description='Convert a CLIP vision tower (OpenAI ViT-B-16.pt or transformers weights) into '
                  "a params directory for a tokenizer run's teacher.path (teacher.kind='clip').")
  parser.add_argument('source', help="OpenAI's TorchScript .pt, a transformers .safetensors / "
                      '.bin, or a transformers model directory')
  parser.add_argument('output', help='the params directory to write (local or gs://)')
  parser.add_argument('--num-heads', type=int, default=None,
                      help='attention heads (default: config.json beside transformers weights, '
                           'else width // 64 as OpenAI)')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty output')
  args = parser.parse_args(argv)
  overrides = {'heads': args.num_heads} if args.num_heads else {}
  try:
    convert(args.source, args.output, overwrite=args.overwrite, **overrides)
  except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
