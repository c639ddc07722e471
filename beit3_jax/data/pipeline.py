"""Deterministic, resumable, host-sharded batches from random-access sources (grain).

One stream is: a random-access source (e.g. `tfds.data_source`) -> shuffled per epoch from the
seed -> repeated -> a per-example transform whose rng depends on the element's global position
-> this host's share (block `process_index` of every run of `global_batch` elements) ->
examples the transform rejects are dropped and counted -> batches of
`global_batch // process_count`.

Because the randomness follows the global position and host i holds rows
[i * B / n, (i + 1) * B / n) of every global batch, the global batch assembled from n hosts
(`to_global`) is the batch one host would have made alone: a run gives the same batches on any
number of hosts (as long as no example is skipped).

Everything is a function of (seed, position): the same seed gives the same batches, any batch
can be recomputed, and the iterator state is a few integers (saved as JSON beside a model
checkpoint). Over one epoch of a source whose length is a multiple of the global batch, the
hosts together see every example exactly once.

A `Mixture` draws one batch from each of several streams per step (pretraining: 'image',
'text', 'pair', each with its own batch size) and `to_global` turns a host's batch into global
jax arrays sharded over the data axes of the mesh.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from beit3_jax import sharding as sharding_lib

Transform = Callable[[Any, np.random.Generator], Any]

# Returned by a transform for an example it cannot use; `reason` is counted.
@dataclasses.dataclass(frozen=True)
class Skip:
  reason: str


class _Counter:
  """Skipped-example counts of one stream (host-local)."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()

  def keep(self, example) -> bool:
    if isinstance(example, Skip):
      self.counts[example.reason] += 1
      return False
    return True


def _stack(examples):
  return jax.tree.map(lambda *xs: np.stack(xs), *examples)


@dataclasses.dataclass
class Stream:
  """One input stream; `iterator()` starts it (or resumes it with `set_state`).

  Attributes:
    source: random access (`len(source)`, `source[i]`), e.g. a TFDS data source.
    transform: (example, rng) -> dict of numpy arrays, or `Skip(reason)`.
    global_batch: examples per step over all hosts (divisible by process_count).
    seed: shuffling and per-example randomness.
    num_epochs: None = repeat forever.
    process_index, process_count: this host's share (default: from jax).
    read_threads: threads that read and transform examples ahead.
  """
  source: Any
  transform: Transform
  global_batch: int
  seed: int
  num_epochs: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  read_threads: int = 2

  def __post_init__(self):
    if self.process_index is None:
      self.process_index = jax.process_index()
    if self.process_count is None:
      self.process_count = jax.process_count()
    if self.global_batch % self.process_count:
      raise ValueError(f'global_batch={self.global_batch} is not divisible by the '
                       f'{self.process_count} hosts.')
    if len(self.source) == 0:
      raise ValueError('The stream\'s source is empty.')
    self.skipped = _Counter()

  @property
  def host_batch(self) -> int:
    return self.global_batch // self.process_count

  def dataset(self) -> grain.IterDataset:
    ds = grain.MapDataset.source(self.source).seed(self.seed).shuffle()
    ds = ds.repeat(self.num_epochs)
    ds = ds.random_map(self.transform)
    ds = HostBlocks(ds, self.process_index, self.process_count, self.global_batch)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                              prefetch_buffer_size=4 * self.host_batch))
    return it.filter(self.skipped.keep).batch(self.host_batch, drop_remainder=True,
                                              batch_fn=_stack)

  def iterator(self) -> grain.DatasetIterator:
    return iter(self.dataset())


class HostBlocks(grain.MapDataset):
  """This host's rows of every global batch: element k is parent element
  (k // h) * global_batch + process_index * h + k % h, with h = global_batch // process_count."""

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int,
               global_batch: int):
    super().__init__(parent)
    self._host_batch = global_batch // process_count
    self._offset = process_index * self._host_batch
    self._global_batch = global_batch
    self._length = len(parent) // global_batch * self._host_batch

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    block, row = divmod(index, self._host_batch)
    return block * self._global_batch + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f'HostBlocks[{self._offset}:+{self._host_batch} of {self._global_batch}]'


class Mixture:
  """One batch of every stream per step: `next(mixture) -> {name: batch}`; resumable."""

  def __init__(self, streams: Mapping[str, Stream]):
    self.streams = dict(streams)
    self._iterators = {name: s.iterator() for name, s in self.streams.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {name: next(it) for name, it in self._iterators.items()}

  def skipped(self) -> dict[str, dict[str, int]]:
    """Examples dropped so far on this host, per stream and reason (for the trainer's logs)."""
    return {name: dict(s.skipped.counts) for name, s in self.streams.items()}

  def get_state(self) -> dict:
    """A JSON-able state: restoring it makes the next batch the one that would have come."""
    return {name: {'iterator': it.get_state(),
                   'skipped': dict(self.streams[name].skipped.counts)}
            for name, it in self._iterators.items()}

  def set_state(self, state: Mapping) -> None:
    missing = set(self.streams) - set(state)
    if missing:
      raise ValueError(f'Data state lacks stream(s) {sorted(missing)}; it has {sorted(state)}.')
    for name, it in self._iterators.items():
      it.set_state(state[name]['iterator'])
      counts = self.streams[name].skipped.counts
      counts.clear()
      counts.update(state[name]['skipped'])


def to_global(host_batch, mesh: Mesh):
  """Host-local numpy arrays (leading axis = this host's examples) -> global jax arrays, laid
  out by `sharding.batch_sharding` (the rules' 'batch' entry: over (data, fsdp))."""
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)
