"""The two layouts of the encoder's layers, and the translation between them.

Loop layout (`scan_layers=False`, torchscale's): one subtree per layer,
`.../encoder/layers_0/...`, ..., `.../encoder/layers_{depth-1}/...`.

Scan layout (`scan_layers=True`): the layers of a group share one subtree whose leaves are
stacked on a new leading axis (logical name 'layers'): `.../encoder/layers/...` holds layers
[0, depth - num_vl_layers) and `.../encoder/vl_layers/...` the top `num_vl_layers` (giant's
vision-language layers, whose FFN has a third expert and so a different tree).

`to_layout(tree, scan=...)` turns a tree of either layout (a backbone's params, a
pretraining or task model's with the backbone under `beit3/`, optimizer moments) into the
other; every leaf outside the layers is left as it is. Conversion to PyTorch, `init_from`
and checkpoints use it, so weights move freely between the layouts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from beit3_jax import param_tree

_LOOP_KEY = re.compile(r'^(.*?(?:^|/)encoder/)layers_(\d+)/(.*)$')
_SCAN_KEY = re.compile(r'^(.*?(?:^|/)encoder/)(layers|vl_layers)/(.*)$')


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Layers [start, start + count) scanned together under `encoder/<name>`."""
  name: str
  start: int
  count: int
  use_vl: bool


def layer_groups(config) -> list[LayerGroup]:
  """The scanned groups of a model config: 'layers' then 'vl_layers' (empty ones left out)."""
  plain = config.depth - config.num_vl_layers
  groups = [LayerGroup('layers', 0, plain, False),
            LayerGroup('vl_layers', plain, config.num_vl_layers, True)]
  return [g for g in groups if g.count]


def scans(config) -> bool:
  """Whether a model config asks for the scan layout (older configs lack the field)."""
  return bool(config.get('scan_layers', False))


def loop_config(config):
  """`config` with `scan_layers=False` (the loop layout torch conversion is written for)."""
  if not scans(config):
    return config
  copy = config.copy_and_resolve_references()
  copy.unlock()
  copy.scan_layers = False
  copy.lock()
  return copy


def is_scanned(tree) -> bool:
  """Whether a (nested or flat) params tree holds stacked layers."""
  return any(_SCAN_KEY.match(k) for k in param_tree.flatten(tree))


def num_vl_layers_of(tree) -> int:
  """The stacked vision-language layers of a scan-layout tree (0 for a loop-layout one)."""
  for key, leaf in param_tree.flatten(tree).items():
    m = _SCAN_KEY.match(key)
    if m and m.group(2) == 'vl_layers':
      return int(np.shape(leaf)[0])
  return 0


def _stack(leaves):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def to_scan(tree, num_vl_layers: int = 0) -> Any:
  """Loop layout -> scan layout. The top `num_vl_layers` layers go to `vl_layers`."""
  flat = param_tree.flatten(tree)
  out, per_layer = {}, {}
  for key, leaf in flat.items():
    m = _LOOP_KEY.match(key)
    if m is None:
      out[key] = leaf
      continue
    per_layer.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = leaf
  depths: dict[str, int] = {}
  for (prefix, _), layers in per_layer.items():
    depths[prefix] = max(depths.get(prefix, 0), max(layers) + 1)
  for (prefix, rest), layers in per_layer.items():
    plain = depths[prefix] - num_vl_layers
    groups = (('layers', range(0, plain)), ('vl_layers', range(plain, depths[prefix])))
    for name, ids in groups:
      present = [layers[i] for i in ids if i in layers]
      if present:
        if len(present) != len(ids):
          raise ValueError(f'{prefix}layers_i/{rest} exists in only some layers of {name}.')
        out[f'{prefix}{name}/{rest}'] = _stack(present)
  return param_tree.unflatten(out)


def to_loop(tree) -> Any:
  """Scan layout -> loop layout (layers_0 ...). `vl_layers` follow `layers`."""
  flat = param_tree.flatten(tree)
  counts: dict[tuple[str, str], int] = {}
  for key, leaf in flat.items():
    m = _SCAN_KEY.match(key)
    if m:
      counts[(m.group(1), m.group(2))] = int(np.shape(leaf)[0])
  out = {}
  for key, leaf in flat.items():
    m = _SCAN_KEY.match(key)
    if m is None:
      out[key] = leaf
      continue
    prefix, name, rest = m.groups()
    start = counts.get((prefix, 'layers'), 0) if name == 'vl_layers' else 0
    for i in range(counts[(prefix, name)]):
      out[f'{prefix}layers_{start + i}/{rest}'] = leaf[i]
  return param_tree.unflatten(out)


def to_layout(tree, *, scan: bool, num_vl_layers: int = 0) -> Any:
  """`tree` (either layout) in the scan layout if `scan`, else in the loop layout."""
  if scan == is_scanned(tree):
    return tree
  return to_scan(tree, num_vl_layers) if scan else to_loop(tree)
