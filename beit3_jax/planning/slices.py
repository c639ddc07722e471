"""TPU slices by name, and what one chip of each generation can do.

A slice is named as gcloud names accelerator types, or as a topology:

    v4-128, v5p-512        TensorCores (two per chip): v5p-512 is 256 chips, 4x8x8
    v5litepod-64, v6e-256  chips: v6e-256 is 256 chips, 16x16
    v5p:8x8x4, v6e:16x16   a topology of chips

v4 and v5p run as one device per chip ("megacore"), so a plan has one device per chip
whatever the generation. `devices(slice, num_slices)` asks libtpu's compiler for the devices of
that topology (no TPU needed), which `jax.jit(...).lower(...).compile()` then targets.

Chip figures (dense bfloat16 peak, HBM capacity and bandwidth per chip) are Google Cloud's
published ones (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
from jax.experimental import topologies

from beit3_jax.chips import CHIPS, Chip


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its generation, its chips and their topology (e.g. 'v5p', (4, 8, 8))."""
  name: str
  generation: str
  topology: tuple[int, ...]
  num_slices: int = 1

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips_per_slice(self) -> int:
    return int(np.prod(self.topology))

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:
    return f'{self.generation}:' + 'x'.join(str(d) for d in self.topology)


# gcloud's accelerator-type prefix -> (generation, accelerator-type units per chip).
_TYPES = {'v4': ('v4', 2), 'v5p': ('v5p', 2), 'v5litepod': ('v5e', 1), 'v5e': ('v5e', 1),
          'v6e': ('v6e', 1)}


def default_topology(generation: str, chips: int) -> tuple[int, ...]:
  """The topology gcloud gives a slice of `chips` chips: 3-D for v4/v5p (2x2x1, 2x2x2,
  2x2x4, 2x4x4, 4x4x4, ...), 2-D for v5e/v6e (1x1, 2x2, 2x4, 4x4, ..., 16x16)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f'{chips} chips: a slice has a power of two of chips.')
  three_d = CHIPS[generation].three_d
  dims = [1, 1, 1] if three_d else [1, 1]
  if three_d and chips >= 4:
    dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def parse(name: str, num_slices: int = 1) -> Slice:
  """A `Slice` from 'v5p-512', 'v4-8', 'v5litepod-64', 'v6e-256' or 'v5p:4x8x8'.

  Raises ValueError naming the accepted forms."""
  name = name.strip()
  if num_slices < 1:
    raise ValueError(f'num_slices={num_slices} must be >= 1.')
  m = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)+)', name)
  if m:
    generation = _TYPES[m.group(1)][0]
    topology = tuple(int(x) for x in m.group(2).split('x'))
    if len(topology) != (3 if CHIPS[generation].three_d else 2):
      raise ValueError(f'{name}: a {generation} topology has '
                       f'{3 if CHIPS[generation].three_d else 2} dimensions.')
    return Slice(name, generation, topology, num_slices)
  m = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', name)
  if m:
    generation, per_chip = _TYPES[m.group(1)]
    units = int(m.group(2))
    if units % per_chip:
      raise ValueError(f'{name}: {m.group(1)} accelerator types count TensorCores, two per '
                       'chip: the number must be even.')
    return Slice(name, generation, default_topology(generation, units // per_chip), num_slices)
  raise ValueError(f'Unknown TPU slice {name!r}: give a gcloud accelerator type (v4-128, '
                   'v5p-512, v5litepod-64, v6e-256) or a topology (v5p:4x8x8, v6e:16x16).')


def devices(tpu: Slice) -> list:
  """The devices of `tpu` (all slices), one per chip, from libtpu's compiler: no TPU needed.

  Raises RuntimeError when libtpu is not installed (pip install 'jax[tpu]')."""
  # libtpu holds a machine-wide lock; compiling needs no exclusive access to a TPU.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  kwargs = {'chip_config_name': 'megacore'} if tpu.chip.megacore else {}
  if tpu.num_slices > 1:
    kwargs['num_slices'] = tpu.num_slices
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=tpu.topology_name,
                                        **kwargs)
  except Exception as e:  # libtpu missing, or a topology it does not know
    raise RuntimeError(f'Could not get the devices of {tpu.topology_name} from libtpu ({e}). '
                       "Install the TPU compiler with: pip install 'jax[tpu]' "
                       '(bash launch/setup_venv.sh tpu).') from e
  devs = list(desc.devices)
  if len(devs) != tpu.chips:
    raise RuntimeError(f'libtpu gave {len(devs)} devices for {tpu.topology_name} x '
                       f'{tpu.num_slices}, expected {tpu.chips} (one per chip).')
  return devs
