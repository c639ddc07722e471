"""Deterministic, resumable, host-sharded batches from random-access sources (grain).

One stream is a global sequence of examples: a random-access source (e.g.
`tfds.data_source`), shuffled per epoch from the seed, repeated, each element transformed with
an rng that depends only on its global index g. Step s of a run uses elements
[s * global_batch, (s + 1) * global_batch) of that sequence, and host i of n takes rows
[i * B / n, (i + 1) * B / n) of every global batch (B = global_batch).

So a stream's position is one integer, the global index of the next batch's first element,
and the batches are a function of (seed, position) alone: the global batch that n hosts
assemble (`to_global`) is the one one host would make, a checkpoint written by N processes
resumes on M processes with no example repeated or skipped, and worker processes
(`Mixture(workers=...)`) change the speed, never the batches.

An example the transform rejects (`Skip(reason)`: an undecodable image, an empty text) still
uses its index: it is counted and replaced by an example drawn from the same source at the
same index of a spare permutation (`on_bad_example='skip'`, the default), or the run stops with
the stream, the record and the reason (`'stop'`). Batches therefore always have their full
size, and the position stays exact.

A validation stream (`pad_final_batch=True`, one epoch) scores every example of its split once:
each example carries a bool `valid`, the last batch is filled up with copies marked
`valid=False`, and a rejected example is not replaced but marked `valid=False` too (and
counted), so the objectives' sums, weighted by `valid`, cover exactly the usable examples.

Execution: the global sequence is a grain `MapDataset`; this host's rows are grouped into host
batches at that level (element k = this host's batch of step k) and the streams' batches into
steps, so read threads and worker processes (grain's `mp_prefetch`: worker w makes the steps
w, w + W, ...) each make whole steps, handed out in order.

A `Mixture` draws one batch from each of several streams per step (pretraining: 'image',
'text', 'pair', each with its own batch size); `DevicePrefetch` runs it in a thread and puts
the batches on the devices ahead of the step, measuring how long the step waits for them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from beit3_jax import sharding as sharding_lib
from beit3_jax.defaults import RunError

Transform = Callable[[Any, np.random.Generator], Any]

ON_BAD_EXAMPLE = ('skip', 'stop')
# Spare permutations tried for a rejected example before the stream gives up.
MAX_REPLACEMENT_DRAWS = 64
# Written in checkpoints; a state without it was written by the per-host format before.
STATE_FORMAT = 'global_position/1'


@dataclasses.dataclass(frozen=True)
class Skip:
  """Returned by a transform for an example it cannot use; `reason` is counted."""
  reason: str


class BadExampleError(RunError):
  """A stream with on_bad_example='stop' met an example its transform rejects."""


@dataclasses.dataclass(frozen=True)
class _Bad:
  """Travels in a batch instead of raising in a worker process (see `BadExampleError`)."""
  message: str


def _stack(examples):
  return jax.tree.map(lambda *xs: np.stack(xs), *examples)


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside `main` (tests, benchmarks) nobody has
  parsed them, so their defaults are taken."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Worker processes leave SIGTERM / SIGINT to the trainer, which finishes its step, saves
  and then stops them (a preemption signal sent to the whole process group must not kill a
  worker in the middle of the step's data). A worker whose trainer died without stopping it
  (SIGKILL, out of memory) exits within a second instead of living on."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=watch_parent, name='watch-trainer', daemon=True).start()


@dataclasses.dataclass
class Stream:
  """One input stream: what it reads, how it transforms and batches it, and this host's share.

  Attributes:
    source: random access (`len(source)`, `source[i]`), e.g. a TFDS data source.
    transform: (example, rng) -> dict of numpy arrays, or `Skip(reason)`.
    global_batch: examples per step over all hosts (divisible by process_count).
    seed: shuffling and per-example randomness.
    num_epochs: None = repeat forever.
    process_index, process_count: this host's share (default: from jax).
    on_bad_example: 'skip' (count and replace) or 'stop' (end the run naming the record).
    name: the stream's name in messages and in its `Mixture`.
    pad_final_batch: validation: every example gets a bool `valid`; the last batch is filled
      with `valid=False` copies, a rejected example is kept as a `valid=False` copy of its
      replacement (needs num_epochs).
  """
  source: Any
  transform: Transform
  global_batch: int
  seed: int
  num_epochs: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  on_bad_example: str = 'skip'
  name: str = 'stream'
  pad_final_batch: bool = False

  def __post_init__(self):
    if self.process_index is None:
      self.process_index = jax.process_index()
    if self.process_count is None:
      self.process_count = jax.process_count()
    if self.global_batch <= 0 or self.global_batch % self.process_count:
      raise ValueError(f'{self.name}: global_batch={self.global_batch} is not a positive '
                       f'multiple of the {self.process_count} hosts.')
    if len(self.source) == 0:
      raise ValueError(f'{self.name}: the stream\'s source is empty.')
    if self.on_bad_example not in ON_BAD_EXAMPLE:
      raise ValueError(f'{self.name}: on_bad_example={self.on_bad_example!r}; expected one '
                       f'of {ON_BAD_EXAMPLE}.')
    if self.pad_final_batch and self.num_epochs is None:
      raise ValueError(f'{self.name}: pad_final_batch needs a finite num_epochs.')

  @property
  def host_batch(self) -> int:
    return self.global_batch // self.process_count

  def examples(self) -> '_Examples':
    """The global sequence: element g = (example, reasons of the rejected draws it replaced)
    or a `_Bad` (on_bad_example='stop')."""
    return _Examples(self)

  def batches(self) -> grain.MapDataset:
    """This host's batches: element k = {'arrays', 'skipped', 'bad'} of step k."""
    ds = _HostBlocks(self.examples(), self.process_index, self.process_count,
                     self.global_batch)
    return ds.batch(self.host_batch, drop_remainder=True, batch_fn=_collate)

  def iterator(self, position: int = 0, *, workers: int = 0,
               read_threads: int = 2) -> Iterator[dict]:
    """This host's batches from global example index `position` on (a one-stream `Mixture`)."""
    mixture = Mixture({self.name: self}, workers=workers, read_threads=read_threads)
    mixture.set_position({self.name: position})
    return _OneStream(mixture, self.name)


class _OneStream:
  """The batches of a one-stream mixture, with its position and skip counts."""

  def __init__(self, mixture: 'Mixture', name: str):
    self.mixture, self.name = mixture, name

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self.mixture)[self.name]

  @property
  def position(self) -> int:
    return self.mixture.snapshot()[self.name]['position']

  def skipped(self) -> dict[str, int]:
    return self.mixture.skipped()[self.name]

  def close(self) -> None:
    self.mixture.close()


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
  """SplitMix64's finaliser: a bijective scramble of a 64-bit integer."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def shuffled_index(index: int, n: int, key: int) -> int:
  """Position `index` of a pseudo-random permutation of range(n) chosen by `key`.

  A 4-round Feistel network on the smallest even number of bits that holds n, walked until it
  lands below n (at most about 4 tries on average): a bijection computed per index in a few
  microseconds, with no table (so any data-set size), unlike grain's `index_shuffle` (about
  0.2 ms an index, measured).
  """
  if not 0 <= index < n:
    raise IndexError(f'index {index} out of range for {n} elements')
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1
  x = index
  while True:
    left, right = x >> half, x & mask
    for r in range(4):
      left, right = right, left ^ (_mix64((key + r * 0x9E3779B97F4A7C15 + right) & _M64) & mask)
    x = (left << half) | right
    if x < n:
      return x


class _Examples(grain.MapDataset):
  """A stream's global sequence, rejected examples replaced (see the module docstring).

  Element g is the transform of record `record(g)` (epoch g // n reshuffled from the seed) with
  an rng keyed by (seed, g). A rejected one is replaced by the first usable draw d = 1, 2, ...:
  record `record(g, d)` of the d-th spare permutation, its rng keyed by (seed, d, g).
  With `pad_final_batch`, elements past the last example (up to a whole global batch) repeat
  the first ones, and every element gets `valid` (False for those and for replacements).
  """

  def __init__(self, stream: Stream):
    super().__init__()
    self._stream = stream
    self._n = len(stream.source)
    self._real = (self._n * stream.num_epochs if stream.num_epochs is not None
                  else sys.maxsize)
    self._length = self._real
    if stream.pad_final_batch:
      self._length = -(-self._real // stream.global_batch) * stream.global_batch

  def __len__(self) -> int:
    return self._length

  def record(self, index: int, draw: int = 0) -> int:
    """The source record of element `index` (draw 0) or of its draw-th replacement."""
    epoch, k = divmod(index, self._n)
    key = _mix64(_mix64(_mix64(self._stream.seed & _M64) ^ draw) ^ (0 if draw else epoch))
    return shuffled_index(k, self._n, key)

  def _draw(self, index: int, draw: int):
    rng = np.random.Generator(np.random.Philox(
        key=np.array([_mix64((self._stream.seed << 8 | draw) & _M64), index], np.uint64)))
    return self._stream.transform(self._stream.source[self.record(index, draw)], rng)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not self._stream.pad_final_batch:
      return self._item(index)
    real = index < self._real
    item = self._item(index % self._real)
    if isinstance(item, _Bad):
      return item
    example, reasons = item
    return {**example, 'valid': np.bool_(real and not reasons)}, (reasons if real else ())

  def _item(self, index: int):
    """(example, reasons of the rejected draws it replaced) or a `_Bad`."""
    example = self._draw(index, 0)
    if not isinstance(example, Skip):
      return example, ()
    s = self._stream
    if s.on_bad_example == 'stop':
      return _Bad(f'Stream {s.name!r}: example {index} (record {self.record(index)} of '
                  f'{_describe(s.source)}) cannot be used: {example.reason}. Fix or remove '
                  "that record, or set the stream's on_bad_example to 'skip' to count and "
                  'replace such examples.')
    reasons = [example.reason]
    for draw in range(1, MAX_REPLACEMENT_DRAWS + 1):
      example = self._draw(index, draw)
      if not isinstance(example, Skip):
        return example, tuple(reasons)
      reasons.append(example.reason)
    return _Bad(f'Stream {s.name!r}: example {index} and {MAX_REPLACEMENT_DRAWS} random '
                f'replacements from {_describe(s.source)} were all rejected (last: '
                f'{example.reason}); is the source unreadable?')

  def __str__(self) -> str:
    return f'Examples[{self._stream.name}]'


def _describe(source) -> str:
  text = str(source)
  return text if len(text) <= 200 else text[:200] + '...'


def _collate(items) -> dict:
  bad = next((x for x in items if isinstance(x, _Bad)), None)
  if bad is not None:
    return {'arrays': None, 'skipped': {}, 'bad': bad.message}
  counts = collections.Counter(r for _, reasons in items for r in reasons)
  return {'arrays': _stack([example for example, _ in items]), 'skipped': dict(counts),
          'bad': None}


class _HostBlocks(grain.MapDataset):
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

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    block, row = divmod(index, self._host_batch)
    return self._parent[block * self._global_batch + self._offset + row]

  def __str__(self) -> str:
    return f'HostBlocks[{self._offset}:+{self._host_batch} of {self._global_batch}]'


class _Steps(grain.MapDataset):
  """Element k: {stream: its host batch of step first + k}, the unit a worker process makes."""

  def __init__(self, batches: Mapping[str, grain.MapDataset], first: Mapping[str, int]):
    super().__init__()
    self._batches = dict(batches)
    self._first = dict(first)
    self._length = min(len(b) - self._first[n] for n, b in self._batches.items())

  def __len__(self) -> int:
    return max(0, self._length)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return {name: b[self._first[name] + index] for name, b in self._batches.items()}

  def __str__(self) -> str:
    return f'Steps[{", ".join(self._batches)}]'


class Mixture:
  """One batch of every stream per step: `next(mixture) -> {name: batch}`; resumable.

  `workers` processes make whole steps (all streams), worker w the steps w, w + W, ... (grain's
  `mp_prefetch`), handed out in order; `read_threads` threads make steps ahead in each worker,
  or in this process without workers. One pool for all streams rather than one per stream: the
  streams of a step are needed together, and W busy processes on W cores waste nothing, where
  a pool per stream would put 3 W processes on them (measured: 12-17% less per core when two
  image workers share a core; docs/performance.md).

  Its state (`snapshot`, then `checkpoint_state`) is each stream's global position and the
  examples skipped so far; `set_state` restarts every stream there, on any number of hosts.
  """

  def __init__(self, streams: Mapping[str, Stream], *, workers: int = 0, read_threads: int = 2):
    if workers < 0 or read_threads < 0:
      raise ValueError(f'workers={workers} and read_threads={read_threads} must be >= 0.')
    self.streams = dict(streams)
    self.workers = int(workers)
    self.read_threads = int(read_threads)
    self._position = {name: 0 for name in self.streams}
    self._restored = {name: collections.Counter() for name in self.streams}  # every host's
    self._local = {name: collections.Counter() for name in self.streams}     # this host's
    self._it = None   # started by the first next()

  def __iter__(self):
    return self

  def _start(self):
    first = {name: self._position[name] // s.global_batch for name, s in self.streams.items()}
    # A worker's arrays reach this process through shared memory (grain's mp_prefetch).
    steps = _Steps({name: s.batches() for name, s in self.streams.items()}, first)
    it = steps.to_iter_dataset(grain.ReadOptions(
        num_threads=self.read_threads, prefetch_buffer_size=max(1, self.read_threads)))
    if self.workers:
      _absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                       per_worker_buffer_size=4),
                          worker_init_fn=_init_worker)
    return iter(it)

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    step = next(self._it)
    for item in step.values():
      if item['bad'] is not None:
        raise BadExampleError(item['bad'])
    out = {}
    for name, item in step.items():
      self._local[name].update(item['skipped'])
      self._position[name] += self.streams[name].global_batch
      arrays = item['arrays']
      # Out of grain's shared memory, which is unlinked when the worker pool stops.
      out[name] = jax.tree.map(np.array, arrays) if self.workers else arrays
    return out

  def skipped(self) -> dict[str, dict[str, int]]:
    """Examples replaced so far, per stream and reason: the total at the restore plus this
    host's since (for the trainer's logs)."""
    return skipped_counts(self.snapshot())

  def snapshot(self) -> dict:
    """The position after the batches handed out so far, with this host's skip counts (cheap;
    `checkpoint_state` turns it into what a checkpoint holds)."""
    return {name: {'position': self._position[name], 'restored': dict(self._restored[name]),
                   'local': dict(self._local[name])} for name in self.streams}

  def get_state(self) -> dict:
    """The checkpoint state now (a collective with several processes: every process calls
    it at the same batch)."""
    return checkpoint_state(self.snapshot())

  def set_position(self, positions: Mapping[str, int],
                   skipped: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Restarts the streams at these global example indices (multiples of their batches)."""
    self.close()
    for name, s in self.streams.items():
      position = int(positions[name])
      if position < 0 or position % s.global_batch:
        raise RunError(f'Stream {name!r}: position {position} is not a multiple of its global '
                       f'batch {s.global_batch}; resume with the batch size the checkpoint was '
                       'written with.')
      self._position[name] = position
      self._restored[name] = collections.Counter((skipped or {}).get(name, {}))
      self._local[name] = collections.Counter()

  def set_state(self, state: Mapping) -> None:
    """Restarts every stream at the position in `state` (from `checkpoint_state`)."""
    if state.get('format') != STATE_FORMAT:
      raise RunError('The checkpoint\'s data position was written in the per-host format of '
                     'an earlier version and cannot be resumed exactly; start a new workdir '
                     'with --config.init_from=<that checkpoint> to keep its weights.')
    streams = state['streams']
    missing = set(self.streams) - set(streams)
    if missing:
      raise ValueError(f'Data state lacks stream(s) {sorted(missing)}; it has '
                       f'{sorted(streams)}.')
    self.set_position({name: streams[name]['position'] for name in self.streams},
                      {name: streams[name].get('skipped', {}) for name in self.streams})

  def close(self) -> None:
    """Stops the worker processes (if any); a later next() starts again where it was."""
    if self._it is not None:
      close = getattr(self._it, 'close', None)
      if close is not None:
        close()
      self._it = None


def skipped_counts(snapshot: Mapping) -> dict[str, dict[str, int]]:
  """Examples replaced per stream and reason in a `Mixture.snapshot`: the total at the restore
  plus this host's since (for the logs; no collective)."""
  return {name: dict(collections.Counter(s['restored']) + collections.Counter(s['local']))
          for name, s in snapshot.items()}


def checkpoint_state(snapshot: Mapping) -> dict:
  """A `Mixture.snapshot` as a checkpoint holds it: positions, and skip counts summed over the
  processes (a collective with several processes)."""
  local = {name: s['local'] for name, s in snapshot.items()}
  if jax.process_count() > 1:
    local = _sum_over_processes(local)
  return {'format': STATE_FORMAT,
          'streams': {name: {'position': s['position'],
                             'skipped': dict(collections.Counter(s['restored'])
                                             + collections.Counter(local[name]))}
                      for name, s in snapshot.items()}}


def _sum_over_processes(counts: dict[str, dict[str, int]], size: int = 1 << 14) -> dict:
  """{stream: {reason: n}} summed over all processes (each sends its counts as JSON bytes)."""
  data = json.dumps(counts).encode()
  if len(data) > size:
    raise ValueError(f'Skip counts too large to gather ({len(data)} bytes).')
  buffer = np.zeros((size + 4,), np.uint8)
  buffer[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
  buffer[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  total: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for row in gathered:
    n = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
    for name, c in json.loads(row[4:4 + n].tobytes().decode()).items():
      total[name].update(c)
  return {name: dict(total[name]) for name in counts}


def to_global(host_batch, mesh: Mesh):
  """Host-local numpy arrays (leading axis = this host's examples) -> global jax arrays, laid
  out by `sharding.batch_sharding` (the rules' 'batch' entry: over (data, fsdp))."""
  sharding = sharding_lib.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


class DevicePrefetch:
  """The training batches, made and put on the devices `depth` steps ahead in a thread.

  `next()` returns the next global batch; `snapshot()` the mixture's position after it (what a
  checkpoint of that step holds); `take_wait()` the seconds `next()` spent waiting for input
  since the last call (the trainer's `data_wait_fraction`).
  """

  def __init__(self, mixture: Mixture, mesh: Mesh, depth: int = 2):
    self.mixture = mixture
    self._mesh = mesh
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._snapshot = mixture.snapshot()
    self._wait = 0.0
    self._thread = threading.Thread(target=self._fill, name='device-prefetch', daemon=True)
    self._thread.start()

  def _fill(self) -> None:
    while not self._stop.is_set():
      try:
        batch = next(self.mixture)
        item = (to_global(batch, self._mesh), self.mixture.snapshot(), None)
      except BaseException as e:  # noqa: BLE001 -- handed to the consumer
        item = (None, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item[2] is not None:
        return

  def __iter__(self):
    return self

  def __next__(self):
    start = time.perf_counter()
    batch, snapshot, error = self._queue.get()
    self._wait += time.perf_counter() - start
    if error is not None:
      self._queue.put((None, None, error))  # every later call fails the same way
      raise error
    self._snapshot = snapshot
    return batch

  def snapshot(self) -> dict:
    return self._snapshot

  def take_wait(self) -> float:
    wait, self._wait = self._wait, 0.0
    return wait

  def close(self) -> None:
    """Stops the thread, then the mixture's workers."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=60)
    self.mixture.close()

