"""Parameter trees as flat dicts, and the one check that a tree fits another.

A parameter tree is a nest of dicts with arrays (or shaped stand-ins such as
`jax.ShapeDtypeStruct`) at the leaves. Its flat form maps `/`-joined paths to leaves:
`{'beit3': {'encoder': {'layers_0': {...}}}}` <-> `{'beit3/encoder/layers_0/...': leaf}`.
The trainer, the converter, `params_io`, the tokenizer and predict all use this module; it
imports nothing of beit3_jax.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np


def flatten(tree) -> dict[str, Any]:
  """`/`-joined path -> leaf of a nested dict (or any pytree with dict keys)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = leaf
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """The nested dict of a flat `/`-joined path -> leaf mapping (the inverse of `flatten`)."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


class TreeMismatch(ValueError):
  """A tree that does not fit the one it should: the message lists every bad leaf."""


@dataclasses.dataclass(frozen=True)
class Diff:
  """What `have` lacks (`missing`), holds beyond `want` (`unexpected`) and holds in another
  shape (`misshaped`: (path, shape held, shape wanted))."""
  missing: tuple[str, ...] = ()
  unexpected: tuple[str, ...] = ()
  misshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.misshaped)


def _as_flat(tree_or_flat) -> Mapping[str, Any]:
  if isinstance(tree_or_flat, Mapping) and all(
      not isinstance(v, Mapping) for v in tree_or_flat.values()):
    return tree_or_flat
  return flatten(tree_or_flat)


def diff(want, have) -> Diff:
  """The leaves where `have` differs from `want` in presence or shape (trees or flat dicts;
  leaves are arrays or anything with a `shape`)."""
  want, have = _as_flat(want), _as_flat(have)
  return Diff(
      missing=tuple(sorted(k for k in want if k not in have)),
      unexpected=tuple(sorted(k for k in have if k not in want)),
      misshaped=tuple((k, tuple(np.shape(have[k])), tuple(np.shape(want[k])))
                      for k in sorted(want)
                      if k in have and tuple(np.shape(have[k])) != tuple(np.shape(want[k]))))


def describe(d: Diff, what: str, target: str, notes: Sequence[str] = (), limit: int = 0,
             verb: str = 'does not fit') -> str:
  """A readable report: '<what> <verb> <target>:' and one line each for the missing,
  unexpected and mis-shaped leaves (`limit` > 0 shows at most that many of each), then `notes`."""
  def show(items):
    items = list(items)
    more = f', ... ({len(items) - limit} more)' if limit and len(items) > limit else ''
    return ', '.join(items[:limit] if limit else items) + more
  lines = [f'{what} {verb} {target}:']
  if d.missing:
    lines.append(f'  missing ({len(d.missing)}): {show(d.missing)}')
  if d.unexpected:
    lines.append(f'  unexpected ({len(d.unexpected)}): {show(d.unexpected)}')
  if d.misshaped:
    lines.append(f'  wrong shape ({len(d.misshaped)}): ' + show(
        f'{k} {got} (expected {want})' for k, got, want in d.misshaped))
  lines += [f'  {n}' for n in notes]
  return '\n'.join(lines)


def check_fits(want, have, what: str, target: str, *, allow_unexpected: bool = False,
               error: type[Exception] = TreeMismatch, notes: Sequence[str] = (),
               limit: int = 0, verb: str = 'does not fit') -> None:
  """Raises `error` with `describe`'s report when `have` lacks a leaf of `want`, holds one in
  another shape, or (unless `allow_unexpected`) holds a leaf `want` does not have."""
  d = diff(want, have)
  if allow_unexpected:
    d = dataclasses.replace(d, unexpected=())
  if d:
    raise error(describe(d, what, target, notes, limit, verb))
