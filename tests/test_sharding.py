"""Sharding on 8 simulated CPU devices: the mesh helper, params born sharded, sharded forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from beit3_jax import models, sharding
from conftest import apply, tiny_config


def test_make_mesh_shapes(eight_devices):
  assert dict(sharding.make_mesh((2, 2, 2)).shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert dict(sharding.make_mesh((1, -1, 1)).shape) == {'data': 1, 'fsdp': 8, 'tensor': 1}
  with pytest.raises(ValueError, match='3 devices'):
    sharding.make_mesh((3, 1, 1))
  with pytest.raises(ValueError, match='at most one'):
    sharding.make_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match='one size per axis'):
    sharding.make_mesh((8,))


def test_every_rule_name_is_used_by_the_model():
  """The rules table lists every logical name the backbone uses (and they are unique)."""
  names = [n for n, _ in sharding.LOGICAL_RULES]
  assert len(names) == len(set(names))
  specs = sharding.logical_specs(models.abstract_params(tiny_config(num_vl_layers=1)))
  used = {n for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
          for n in spec if n is not None}
  assert used <= set(names), used - set(names)


def test_batch_spec_comes_from_the_rules_table(eight_devices):
  """The batch's layout is the rules' 'batch' entry, for the leading axis only."""
  table = dict(sharding.LOGICAL_RULES)
  assert sharding.batch_spec() == nn.logical_to_mesh_axes(('batch',), sharding.LOGICAL_RULES)
  assert sharding.batch_spec() == P(table['batch'])
  assert sharding.batch_spec() == P(('data', 'fsdp'))   # what the trainer has always used
  other = (('batch', 'data'),) + tuple(r for r in sharding.LOGICAL_RULES if r[0] != 'batch')
  assert sharding.batch_spec(other) == P('data')
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.batch_sharding(mesh) == jax.sharding.NamedSharding(mesh, P(table['batch']))


@pytest.fixture(scope='module')
def sharded_setup(eight_devices):
  cfg = tiny_config(embed_dim=64, num_heads=4, mlp_dim=128, vocab_size=96)
  mesh = sharding.make_mesh((2, 2, 2))
  model = models.BEiT3(cfg)
  example = models.example_inputs(cfg, batch_size=2)
  params = sharding.init_sharded(lambda r: model.init(r, **example)['params'], mesh,
                                 jax.random.key(0))
  return cfg, mesh, params


def test_params_are_born_sharded_as_the_rules_say(sharded_setup):
  cfg, mesh, params = sharded_setup
  layer = params['encoder']['layers_0']
  expect = {
      'text_embed/embedding': (params['text_embed']['embedding'], P('tensor', 'fsdp')),
      'q_proj kernel (embed, heads, kv)': (layer['self_attn']['q_proj']['A']['kernel'],
                                           P('fsdp', 'tensor', None)),
      'q_proj bias (heads, kv)': (layer['self_attn']['q_proj']['B']['bias'], P('tensor', None)),
      'out_proj kernel (heads, kv, embed)': (layer['self_attn']['out_proj']['A']['kernel'],
                                             P('tensor', None, 'fsdp')),
      'fc1 kernel (embed, mlp)': (layer['ffn']['A']['fc1']['kernel'], P('fsdp', 'tensor')),
      'fc2 kernel (mlp, embed)': (layer['ffn']['B']['fc2']['kernel'], P('tensor', 'fsdp')),
      'ffn_layernorm (mlp)': (layer['ffn']['A']['ffn_layernorm']['scale'], P('tensor')),
      'final_layer_norm (norm)': (layer['final_layer_norm']['A']['scale'], P(None)),
      'position table (posemb, embed)': (
          params['encoder']['embed_positions']['A']['embedding'], P(None, 'fsdp')),
      'patch kernel': (params['vision_embed']['proj']['kernel'], P(None, None, None, 'fsdp')),
      'cls token': (params['vision_embed']['cls_token'], P(None, None, 'fsdp')),
  }
  for what, (array, spec) in expect.items():
    assert array.sharding.mesh.shape == mesh.shape, what
    assert array.sharding.spec == spec, (what, array.sharding.spec)
  # The shards really are pieces: fc1 kernel (64, 128) over fsdp 2 x tensor 2 -> (32, 64).
  fc1 = layer['ffn']['A']['fc1']['kernel']
  assert {s.data.shape for s in fc1.addressable_shards} == {(32, 64)}


def test_all_params_follow_the_rules_table(sharded_setup):
  cfg, mesh, params = sharded_setup
  boxed = models.abstract_params(cfg)
  want = sharding.mesh_shardings(boxed, mesh)
  got = jax.tree.map(lambda x: x.sharding, params)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert w.spec == g.spec


@pytest.mark.parametrize('mode', ['image', 'text', 'image+text'])
def test_sharded_forward_equals_single_device(sharded_setup, mode):
  cfg, mesh, params = sharded_setup
  rng = np.random.default_rng(0)
  x = {}
  if 'image' in mode:
    x['images'] = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  if 'text' in mode:
    x['text_ids'] = rng.integers(0, cfg.vocab_size, (8, 6)).astype(np.int32)
    x['text_padding_mask'] = np.zeros((8, 6), bool)
    x['text_padding_mask'][::3, 4:] = True
  single_params = jax.device_put(jax.device_get(params), jax.devices()[0])
  expected = apply(cfg, single_params, **x, return_hidden_states=True)

  batch_sharding = sharding.batch_sharding(mesh)
  x_sharded = {k: jax.device_put(v, batch_sharding) for k, v in x.items()}
  model = models.BEiT3(cfg)
  with sharding.use_mesh(mesh):
    fn = jax.jit(lambda p, a: model.apply({'params': p}, **a, return_hidden_states=True))
    got = fn(params, x_sharded)
  assert got['encoder_out'].sharding.spec[0] == ('data', 'fsdp')  # activations stay batch-sharded
  np.testing.assert_allclose(np.asarray(got['encoder_out']), np.asarray(expected['encoder_out']),
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got['hidden_states']),
                             np.asarray(expected['hidden_states']), atol=1e-5, rtol=0)


def test_logical_constraints_are_no_ops_without_a_mesh():
  x = jnp.ones((2, 3, 4))
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    assert nn.with_logical_constraint(x, ('batch', 'length', 'embed')) is x
