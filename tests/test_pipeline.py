"""The resumable, host-sharded stream machinery on small in-memory sources."""

import json

import jax
import numpy as np
import pytest

from beit3_jax import sharding
from beit3_jax.data import pipeline


def ident(example, rng):
  return {'x': np.int64(example), 'r': rng.integers(0, 1 << 30)}


def skip_multiples_of_7(example, rng):
  if example % 7 == 0:
    return pipeline.Skip('multiple of 7')
  return ident(example, rng)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_deterministic_and_resumable():
  make = lambda: pipeline.Mixture({
      'a': pipeline.Stream(list(range(40)), ident, global_batch=4, seed=3,
                           process_index=0, process_count=1),
      'b': pipeline.Stream(list(range(100, 130)), skip_multiples_of_7, global_batch=6, seed=5,
                           process_index=0, process_count=1)})
  straight = take(make(), 12)
  again = take(make(), 12)
  for x, y in zip(straight, again):
    jax.tree.map(np.testing.assert_array_equal, x, y)

  first = make()
  take(first, 5)
  state = json.loads(json.dumps(first.get_state()))  # survives JSON
  resumed = make()
  resumed.set_state(state)
  for expected, got in zip(straight[5:], take(resumed, 7)):
    jax.tree.map(np.testing.assert_array_equal, expected, got)
  assert resumed.skipped()['b']['multiple of 7'] > 0
  assert resumed.skipped() == make_and_run(make, 12).skipped()
  with pytest.raises(ValueError, match='lacks stream'):
    make().set_state({'a': state['a']})


def make_and_run(make, n):
  m = make()
  take(m, n)
  return m


def test_batches_have_host_shape_and_skips_are_dropped():
  stream = pipeline.Stream(list(range(21)), skip_multiples_of_7, global_batch=4, seed=0,
                           process_index=0, process_count=1, num_epochs=1)
  batches = list(stream.iterator())
  seen = np.concatenate([b['x'] for b in batches])
  assert all(b['x'].shape == (4,) for b in batches)
  assert len(seen) == 16 and len(set(seen.tolist())) == 16  # 18 kept, 2 in a partial batch
  assert not set(seen.tolist()) & {0, 7, 14}
  assert stream.skipped.counts['multiple of 7'] == 3


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


def test_bad_stream_arguments():
  with pytest.raises(ValueError, match='divisible'):
    pipeline.Stream(list(range(8)), ident, global_batch=5, seed=0, process_index=0,
                    process_count=2)
  with pytest.raises(ValueError, match='empty'):
    pipeline.Stream([], ident, global_batch=2, seed=0)


def test_to_global_shards_the_batch_over_data_axes(eight_devices):
  mesh = sharding.make_mesh((2, 2, 2))
  batch = {'x': np.arange(8 * 3).reshape(8, 3)}
  arrays = pipeline.to_global(batch, mesh)
  assert arrays['x'].shape == (8, 3)
  assert arrays['x'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  np.testing.assert_array_equal(np.asarray(arrays['x']), batch['x'])
