"""Device mesh, the logical-axis rules table, and sharded initialisation.

Every parameter and every block-boundary activation carries logical axis names; `LOGICAL_RULES`
is the one table that maps them to the mesh axes `data`, `fsdp` and `tensor`. The rules are
tried in order and a mesh axis is used at most once per array, so an activation
(`batch`, `length`, `embed`) puts `batch` on (data, fsdp) and leaves `embed` unsharded, while a
parameter (`embed`, `mlp`) puts `embed` on fsdp and `mlp` on tensor.

Typical use::

    mesh = make_mesh(config.mesh_shape)                       # e.g. (-1, 1, 1)
    params = init_sharded(lambda rng: model.init(rng, **inputs)['params'], mesh, rng)
    with use_mesh(mesh):
      out = jax.jit(model.apply)({'params': params}, ...)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axis (or axes, or None = replicated). Order matters: see above.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),   # examples of a batch
    ('length', None),              # sequence positions
    ('embed', 'fsdp'),             # model width D (params: FSDP; activations: taken by batch)
    ('heads', 'tensor'),           # attention heads
    ('kv', None),                  # per-head features d
    ('mlp', 'tensor'),             # FFN inner width F
    ('vocab', 'tensor'),           # text vocabulary rows and logits
    ('codebook', 'tensor'),        # visual-token codebook entries
    ('norm', None),                # LayerNorm scale/bias over D
    ('posemb', None),              # rows of a position table
    ('patch_h', None),             # patch-projection kernel (P, P, C, D)
    ('patch_w', None),
    ('channels', None),
    ('code', None),                # VQ-KD codebook vectors (code_dim)
    ('teacher', None),             # VQ-KD decoder outputs (teacher feature size)
)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """A Mesh over `devices` (default: all) with axes `axis_names` = (data, fsdp, tensor).

  `mesh_shape` gives one size per axis; at most one entry may be -1, meaning "the rest of the
  devices". Raises ValueError if the sizes do not multiply to the device count.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  shape = [int(s) for s in mesh_shape]
  if len(shape) != len(axis_names):
    raise ValueError(f'mesh_shape {tuple(shape)} must give one size per axis {tuple(axis_names)}.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh_shape {tuple(shape)}: at most one entry may be -1.')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if known <= 0 or devices.size % known:
      raise ValueError(f'mesh_shape {tuple(shape)} does not divide {devices.size} devices.')
    shape[shape.index(-1)] = devices.size // known
  if int(np.prod(shape)) != devices.size:
    raise ValueError(f'mesh_shape {tuple(shape)} has {int(np.prod(shape))} devices, '
                     f'but {devices.size} are available.')
  return Mesh(devices.reshape(shape), tuple(axis_names))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES):
  """Context under which models trace with `mesh` and the logical `rules` (activation constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_specs(boxed_tree) -> Any:
  """PartitionSpecs of logical axis names for a tree of `nn.LogicallyPartitioned` leaves."""
  return nn.get_partition_spec(boxed_tree)


def mesh_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings over `mesh` for a tree of boxed (logically named) leaves, per `rules`."""
  return nn.logical_to_mesh_sharding(logical_specs(boxed_tree), mesh, rules)


def init_sharded(init_fn: Callable[[jax.Array], Any], mesh: Mesh, rng: jax.Array,
                 rules=LOGICAL_RULES) -> Any:
  """Runs `init_fn(rng)` under jit with output shardings from the rules: params born sharded.

  `init_fn` returns a tree whose leaves are `nn.LogicallyPartitioned` (e.g. a model's
  `init(...)['params']`). The result has plain arrays, each already laid out over `mesh`.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = mesh_shardings(abstract, mesh, rules)

  def unboxed_init(r):
    return nn.meta.unbox(init_fn(r))

  with use_mesh(mesh, rules):
    return jax.jit(unboxed_init, out_shardings=shardings)(rng)


def batch_spec(rules=LOGICAL_RULES) -> PartitionSpec:
  """The PartitionSpec of a batch array: its leading (example) axis goes where `rules` put the
  logical axis 'batch' ((data, fsdp) with `LOGICAL_RULES`), every other axis is replicated."""
  return nn.logical_to_mesh_axes(('batch',), rules)


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """`batch_spec` over `mesh`: how every input batch (and each of its leaves) is laid out."""
  return NamedSharding(mesh, batch_spec(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
