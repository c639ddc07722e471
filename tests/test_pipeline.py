"""The resumable, host-sharded stream machinery on small in-memory sources."""

import collections
import json

import jax
import numpy as np
import pytest

from beit3_jax import sharding
from beit3_jax.data import pipeline
from beit3_jax.defaults import RunError


def ident(example, rng):
  return {'x': np.int64(example), 'r': rng.integers(0, 1 << 30)}


def skip_multiples_of_7(example, rng):
  if example % 7 == 0:
    return pipeline.Skip('multiple of 7')
  return ident(example, rng)


def fail_on_13(example, rng):
  if example == 13:
    raise ZeroDivisionError('a bug in the transform at 13')
  return ident(example, rng)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def mixture(workers=0, process_index=0, process_count=1):
  return pipeline.Mixture({
      'a': pipeline.Stream(list(range(40)), ident, global_batch=4, seed=3,
                           process_index=process_index, process_count=process_count, name='a'),
      'b': pipeline.Stream(list(range(100, 130)), skip_multiples_of_7, global_batch=6, seed=5,
                           process_index=process_index, process_count=process_count,
                           name='b')}, workers=workers)


def test_deterministic_and_resumable():
  straight = take(mixture(), 12)
  assert_same(straight, take(mixture(), 12))

  first = mixture()
  take(first, 5)
  state = json.loads(json.dumps(first.get_state()))  # survives JSON
  assert state['streams']['a']['position'] == 5 * 4 and state['streams']['b']['position'] == 30
  resumed = mixture()
  resumed.set_state(state)
  assert_same(straight[5:], take(resumed, 7))
  assert resumed.skipped()['b']['multiple of 7'] > 0
  whole = mixture()
  take(whole, 12)
  assert resumed.skipped() == whole.skipped()
  with pytest.raises(ValueError, match='lacks stream'):
    mixture().set_state({**state, 'streams': {'a': state['streams']['a']}})
  with pytest.raises(RunError, match='per-host format'):
    mixture().set_state({'format': 'per_host'})
  with pytest.raises(RunError, match='multiple of its global batch'):
    mixture().set_state({**state, 'streams': {**state['streams'], 'a': {'position': 6}}})


def test_rejected_examples_are_replaced_counted_and_use_their_index():
  stream = pipeline.Stream(list(range(21)), skip_multiples_of_7, global_batch=4, seed=0,
                           process_index=0, process_count=1, num_epochs=1)
  it = stream.iterator()
  batches = list(it)
  assert len(batches) == 5 and all(b['x'].shape == (4,) for b in batches)   # 21 // 4
  seen = np.concatenate([b['x'] for b in batches])
  assert not set(seen.tolist()) & {0, 7, 14}
  # The three rejected indices (those among the first 20 used) were replaced, not dropped.
  examples = stream.examples()
  order = [examples.record(i) for i in range(20)]
  # Every rejected draw is counted: the primary ones and any rejected replacement.
  rejected = 0
  for index in range(20):
    draw = 0
    while examples.record(index, draw) % 7 == 0:
      rejected, draw = rejected + 1, draw + 1
  assert rejected >= sum(1 for x in order if x % 7 == 0) > 0
  assert it.skipped() == {'multiple of 7': rejected} and it.position == 20
  for index, record in enumerate(order):   # the others in their places
    assert seen[index] == record or record % 7 == 0


def test_on_bad_example_stop_names_the_stream_and_record():
  stream = pipeline.Stream(list(range(21)), skip_multiples_of_7, global_batch=21, seed=0,
                           process_index=0, process_count=1, on_bad_example='stop',
                           name='image')
  with pytest.raises(pipeline.BadExampleError,
                     match=r"Stream 'image': example \d+ \(record (0|7|14) of .*multiple of 7"):
    next(stream.iterator())


def test_a_transform_error_in_a_worker_reaches_the_trainer():
  stream = pipeline.Stream(list(range(20)), fail_on_13, global_batch=20, seed=0,
                           process_index=0, process_count=1)
  it = stream.iterator(workers=1)
  with pytest.raises(ZeroDivisionError, match='a bug in the transform at 13'):
    next(it)
  it.close()


def test_worker_processes_give_the_same_batches_and_resume_exactly():
  straight = take(mixture(), 9)
  with_workers = mixture(workers=2)
  assert_same(straight[:4], take(with_workers, 4))
  state = with_workers.get_state()
  with_workers.close()
  resumed = mixture(workers=2)
  resumed.set_state(state)
  assert_same(straight[4:], take(resumed, 5))
  assert resumed.skipped() == {'a': {}, 'b': dict(mixture_skipped(9))}
  assert mixture(workers=2).streams['a'].name == 'a'   # nothing started before next()
  resumed.close()


def mixture_skipped(n):
  m = mixture()
  take(m, n)
  return m.skipped()['b']


@pytest.mark.parametrize('before,after', [(2, 1), (1, 2)])
def test_a_checkpoint_of_n_hosts_resumes_on_m_hosts_without_repeats_or_gaps(before, after):
  def run(process_count, steps, state=None):
    hosts = [mixture(process_index=i, process_count=process_count)
             for i in range(process_count)]
    for h in hosts:
      if state is not None:
        h.set_state(state)
    seen = []
    for _ in range(steps):
      parts = [next(h) for h in hosts]
      seen.append({k: np.concatenate([p[k]['x'] for p in parts]) for k in ('a', 'b')})
    return seen, hosts[0].get_state()

  straight, _ = run(1, 10)
  first, state = run(before, 4)
  second, _ = run(after, 6, json.loads(json.dumps(state)))
  assert_same(straight, first + second)
  examples_a = np.concatenate([s['a'] for s in first + second])
  assert sorted(examples_a.tolist()) == sorted(list(range(40)))   # 10 x 4 = one epoch


def test_two_hosts_see_each_example_once_per_epoch():
  n, global_batch = 48, 8
  seen = []
  for host in (0, 1):
    stream = pipeline.Stream(list(range(n)), ident, global_batch=global_batch, seed=11,
                             process_index=host, process_count=2, num_epochs=1)
    batches = list(stream.iterator())
    assert len(batches) == n // global_batch and batches[0]['x'].shape == (4,)
    seen.extend(np.concatenate([b['x'] for b in batches]).tolist())
  assert sorted(seen) == list(range(n))


def test_epochs_are_reshuffled_and_complete():
  stream = pipeline.Stream(list(range(12)), ident, global_batch=4, seed=1,
                           process_index=0, process_count=1, num_epochs=2)
  xs = np.concatenate([b['x'] for b in stream.iterator()])
  assert sorted(xs[:12].tolist()) == sorted(xs[12:].tolist()) == list(range(12))
  assert xs[:12].tolist() != xs[12:].tolist()


@pytest.mark.parametrize('hosts', [1, 2])
def test_a_validation_epoch_scores_every_usable_example_once(hosts):
  """pad_final_batch: 23 examples in batches of 4 -> 6 batches; the one padding row and the
  rejected examples (multiples of 7) are valid=False, every other record is valid once."""
  n = 23
  rows, skipped = [], collections.Counter()
  for host in range(hosts):
    stream = pipeline.Stream(list(range(n)), skip_multiples_of_7, global_batch=4, seed=2,
                             process_index=host, process_count=hosts, num_epochs=1,
                             pad_final_batch=True)
    it = stream.iterator()
    batches = list(it)
    assert len(batches) == 6 and all(b['valid'].dtype == bool for b in batches)
    rows += [(int(x), bool(v)) for b in batches for x, v in zip(b['x'], b['valid'])]
    skipped.update(it.skipped())
  assert len(rows) == 24
  valid = sorted(x for x, v in rows if v)
  assert valid == [x for x in range(n) if x % 7]
  assert sum(1 for _, v in rows if not v) == 24 - len(valid)
  # records 0, 7, 14 and 21 rejected (and any rejected replacement draw), counted
  assert set(skipped) == {'multiple of 7'} and skipped['multiple of 7'] >= 4


def test_a_training_stream_has_no_valid_field_and_pad_needs_epochs():
  stream = pipeline.Stream(list(range(10)), ident, global_batch=4, seed=0, process_index=0,
                           process_count=1, num_epochs=1)
  batches = list(stream.iterator())
  assert len(batches) == 2 and 'valid' not in batches[0]    # 10 // 4: training drops the rest
  with pytest.raises(ValueError, match='pad_final_batch needs a finite num_epochs'):
    pipeline.Stream(list(range(10)), ident, global_batch=4, seed=0, pad_final_batch=True)


@pytest.mark.parametrize('n', [1, 2, 3, 10, 48, 1000, 4097])
def test_shuffled_index_is_a_permutation(n):
  for key in (0, 12345, 2 ** 63 + 7):
    perm = [pipeline.shuffled_index(i, n, key) for i in range(n)]
    assert sorted(perm) == list(range(n))
  if n >= 48:
    assert perm != list(range(n))
    assert [pipeline.shuffled_index(i, n, 1) for i in range(n)] != perm
  with pytest.raises(IndexError):
    pipeline.shuffled_index(n, n, 0)


def test_bad_stream_arguments():
  with pytest.raises(ValueError, match='multiple'):
    pipeline.Stream(list(range(8)), ident, global_batch=5, seed=0, process_index=0,
                    process_count=2)
  with pytest.raises(ValueError, match='empty'):
    pipeline.Stream([], ident, global_batch=2, seed=0)
  with pytest.raises(ValueError, match='on_bad_example'):
    pipeline.Stream([1], ident, global_batch=1, seed=0, on_bad_example='ignore')


def test_device_prefetch_keeps_the_position_of_the_batches_handed_out(eight_devices):
  mesh = sharding.make_mesh((2, 1, 4))
  source = mixture()
  data = pipeline.DevicePrefetch(source, mesh, depth=2)
  try:
    first = [next(data) for _ in range(3)]
    # The thread is ahead, the snapshot is not.
    assert data.snapshot()['a']['position'] == 3 * 4
    straight = take(mixture(), 3)
    for got, expected in zip(first, straight):
      np.testing.assert_array_equal(np.asarray(got['a']['x']), expected['a']['x'])
    assert data.take_wait() >= 0.0 and data.take_wait() == 0.0
  finally:
    data.close()


def test_to_global_shards_the_batch_over_data_axes(eight_devices):
  mesh = sharding.make_mesh((2, 2, 2))
  batch = {'x': np.arange(8 * 3).reshape(8, 3)}
  arrays = pipeline.to_global(batch, mesh)
  assert arrays['x'].shape == (8, 3)
  assert arrays['x'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  np.testing.assert_array_equal(np.asarray(arrays['x']), batch['x'])
