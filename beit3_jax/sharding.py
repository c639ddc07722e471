"""Device mesh, the logical-axis rules table, and sharded initialisation.

Every parameter and every block-boundary activation carries logical axis names; `LOGICAL_RULES`
is the one table that maps them to the mesh axes `data`, `fsdp` and `tensor`. The rules are
tried in order and a mesh axis is used at most once per array, so an activation
(`batch`, `length`, `embed`) puts `batch` on (data, fsdp) and leaves `embed` unsharded, while a
parameter (`embed`, `mlp`) puts `embed` on fsdp and `mlp` on tensor.

The rules are applied with the array's shape in hand (`resolve_spec`): a mesh axis goes on a
dimension only if its size divides that dimension. A parameter dimension that does not divide
(giant's width 1408 over a 256-way `fsdp`, base's 12 heads over an 8-way `tensor`) passes its
mesh axis to the largest other dimension of the same parameter that it divides (the FFN's 6144,
a vocabulary of 64,010 over 2); a parameter with no such dimension is replicated over that axis
and listed by `unplaced` (the planner reports them). So no shape ever reaches XLA unevenly
split. Activations never move their axes: a batch that does not divide (data x fsdp) is refused
by name at config time (`check_batch`).

Multislice: the device mesh of several TPU slices is `(data, fsdp, tensor)` as well, with the
`data` axis spanning the slices over the data-centre network (DCN) and `fsdp` / `tensor` inside
each slice (`make_mesh` with devices that carry a `slice_index`).

Typical use::

    mesh = make_mesh(config.mesh_shape)                       # e.g. (-1, 1, 1)
    params = init_sharded(lambda rng: model.init(rng, **inputs)['params'], mesh, rng)
    with use_mesh(mesh):
      out = jax.jit(model.apply)({'params': params}, ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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
    ('layers', None),              # the stacked-layers axis of scanned layers
)


def _fill(mesh_shape: Sequence[int], n_devices: int, what: str) -> list[int]:
  shape = [int(x) for x in mesh_shape]
  if shape.count(-1) > 1:
    raise ValueError(f'mesh_shape {tuple(shape)}: at most one entry may be -1.')
  known = int(np.prod([x for x in shape if x != -1]))
  if -1 in shape:
    if known <= 0 or n_devices % known:
      raise ValueError(f'mesh_shape {tuple(shape)} does not divide {n_devices} {what}.')
    shape[shape.index(-1)] = n_devices // known
  if int(np.prod(shape)) != n_devices:
    raise ValueError(f'mesh_shape {tuple(shape)} has {int(np.prod(shape))} devices, '
                     f'but {n_devices} {what} are available.')
  return shape


def num_slices(devices) -> int:
  """How many TPU slices `devices` span (distinct `slice_index`; 1 on CPU and one slice)."""
  return len({getattr(d, 'slice_index', 0) or 0 for d in np.asarray(devices).flat})


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices=None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
  """A Mesh over `devices` (default: all) with axes `axis_names` = (data, fsdp, tensor).

  `mesh_shape` gives one size per axis for one slice; at most one entry may be -1, meaning
  "the rest of the devices". When the devices span several TPU slices (multislice), the mesh
  is a hybrid one: `mesh_shape` lays out each slice (over its fast ICI links) and the `data`
  axis is multiplied by the number of slices (across slices over DCN), so FSDP and tensor
  parallelism never cross a slice. Raises ValueError if the sizes do not multiply to the
  device count (of one slice).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  if len(mesh_shape) != len(axis_names):
    raise ValueError(f'mesh_shape {tuple(mesh_shape)} must give one size per axis '
                     f'{tuple(axis_names)}.')
  slices = num_slices(devices)
  if slices == 1:
    shape = _fill(mesh_shape, devices.size, 'devices')
    return Mesh(devices.reshape(shape), tuple(axis_names))
  per_slice = _fill(mesh_shape, devices.size // slices, 'devices per slice')
  dcn = [slices] + [1] * (len(axis_names) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, list(devices.flat),
                                              allow_split_physical_axes=True)
  return Mesh(grid, tuple(axis_names))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES):
  """Context under which models trace with `mesh` and the logical `rules` (activation constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_specs(boxed_tree) -> Any:
  """PartitionSpecs of logical axis names for a tree of `nn.LogicallyPartitioned` leaves."""
  return nn.get_partition_spec(boxed_tree)


def _rule_table(rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for name, axes in rules:
    if name in table:
      continue
    table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return table


@dataclasses.dataclass(frozen=True)
class Unplaced:
  """A mesh axis that the rules meant for an array but that divides none of its dimensions."""
  mesh_axis: str
  logical_axis: str
  shape: tuple[int, ...]


def resolve_spec(names: Sequence[str | None], shape: Sequence[int],
                 axis_sizes: Mapping[str, int], rules=LOGICAL_RULES, *,
                 move: bool = True) -> tuple[PartitionSpec, list[Unplaced]]:
  """The PartitionSpec of an array with logical axis `names` and `shape` on a mesh of
  `axis_sizes` ({'data': 2, 'fsdp': 128, 'tensor': 1}), and the mesh axes left unplaced.

  Each dimension takes the mesh axes its rule names, in order, that are not yet used by this
  array and whose size divides what is left of the dimension. With `move` (parameters), a
  mesh axis that did not divide goes to the largest other dimension it divides; if none, it
  is unplaced (the array is replicated over it).
  """
  if len(names) != len(shape):
    raise ValueError(f'logical names {tuple(names)} do not match shape {tuple(shape)}.')
  table = _rule_table(rules)
  dims: list[list[str]] = [[] for _ in shape]
  used: set[str] = set()
  pending: list[tuple[str, str]] = []
  for i, (name, size) in enumerate(zip(names, shape)):
    if name is None:
      continue
    if name not in table:
      raise ValueError(f'logical axis {name!r} is not in the rules table '
                       f'({sorted(table)}); add it to beit3_jax.sharding.LOGICAL_RULES.')
    for axis in table[name]:
      if axis in used or int(axis_sizes.get(axis, 1)) == 1:
        continue   # a mesh axis of size 1 splits nothing: left out of the spec
      n = int(axis_sizes[axis])
      if size % (int(np.prod([axis_sizes[a] for a in dims[i]])) * n) == 0:
        dims[i].append(axis)
        used.add(axis)
      else:
        pending.append((axis, name))
  unplaced = []
  for axis, name in pending:
    if axis in used:
      continue
    n = int(axis_sizes[axis])
    fits = [j for j, size in enumerate(shape)
            if move and size % (int(np.prod([axis_sizes[a] for a in dims[j]])) * n) == 0]
    if fits:
      j = max(fits, key=lambda k: (shape[k], -k))
      dims[j].append(axis)
      used.add(axis)
    elif n > 1:
      unplaced.append(Unplaced(axis, name, tuple(int(x) for x in shape)))
  spec = PartitionSpec(*[None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in dims])
  return spec, unplaced


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x.value if _is_boxed(x) else x))


def param_specs(boxed_tree, axis_sizes: Mapping[str, int], rules=LOGICAL_RULES) -> Any:
  """PartitionSpecs (unboxed tree) of every leaf of a boxed (logically named) tree; leaves
  without names are replicated."""
  def spec(x):
    if not _is_boxed(x) or not hasattr(x.value, 'shape'):
      return PartitionSpec()   # unnamed, or no array (e.g. optax's MaskedNode of a frozen leaf)
    return resolve_spec(x.names, _shape(x), axis_sizes, rules)[0]
  return jax.tree.map(spec, boxed_tree, is_leaf=_is_boxed)


def unplaced(boxed_tree, axis_sizes: Mapping[str, int], rules=LOGICAL_RULES
             ) -> dict[str, list[Unplaced]]:
  """'a/b/kernel' -> the mesh axes the rules meant for it that divide none of its dims."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=_is_boxed):
    if _is_boxed(x) and hasattr(x.value, 'shape'):
      missed = resolve_spec(x.names, _shape(x), axis_sizes, rules)[1]
      if missed:
        out[jax.tree_util.keystr(path, simple=True, separator='/')] = missed
  return out


def mesh_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings over `mesh` for a tree of boxed (logically named) leaves, per `rules`
  applied with each leaf's shape (`resolve_spec`)."""
  specs = param_specs(boxed_tree, dict(mesh.shape), rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names, per the rules in context
  (`use_mesh`); a mesh axis that does not divide its dimension is left out. No-op without a
  mesh or rules."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec, _ = resolve_spec(tuple(names), x.shape, dict(mesh.shape), rules, move=False)
  return jax.lax.with_sharding_constraint(x, spec)


def check_batch(batch_sizes: Mapping[str, int], mesh_shape: Mapping[str, int],
                micro_batches: int = 1, rules=LOGICAL_RULES) -> None:
  """Raises ValueError naming the first batch size (a config field) that does not split over
  the mesh axes of the logical axis 'batch' (data x fsdp), micro-batches included."""
  axes = _rule_table(rules)['batch']
  ways = int(np.prod([mesh_shape.get(a, 1) for a in axes]))
  for field, size in batch_sizes.items():
    if not size:
      continue
    if size % micro_batches or (size // micro_batches) % ways:
      raise ValueError(
          f'{field}={size} with micro_batches={micro_batches} gives micro-batches of '
          f'{size / micro_batches:g} examples, which do not split over the {ways} devices of '
          f'the mesh axes {axes} ({dict(mesh_shape)}): make it a multiple of '
          f'{ways * micro_batches}, or change mesh_shape or micro_batches.')


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
  axes = _rule_table(rules)['batch']
  return PartitionSpec(axes[0] if len(axes) == 1 else (axes or None))


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
  """`batch_spec` over `mesh`: how every input batch (and each of its leaves) is laid out."""
  return NamedSharding(mesh, batch_spec(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
