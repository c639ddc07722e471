"""Options for scale: scanned layers, remat policies, bfloat16 optimizer state and parameters.
The scan layout computes what the loop layout computes, weights move between the layouts
(conversion, init_from, layer decay), and every remat policy gives the same gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from beit3_jax import convert, models, param_tree, params_io
from beit3_jax.models import layer_stack
from beit3_jax.models.config import REMAT_POLICIES
from beit3_jax.trainer import checkpoints
from beit3_jax.trainer import optimizer as optimizer_lib
from conftest import apply, tiny_config

pytestmark = pytest.mark.usefixtures('fast_compile')

PAPER = dict(depth=3, shared_attention=True, num_vl_layers=1)   # giant's layout, tiny


def _inputs(cfg, batch=2, text_len=6, seed=0):
  rng = np.random.default_rng(seed)
  pad = np.zeros((batch, text_len), bool)
  pad[0, 4:] = True
  return dict(images=rng.uniform(-1, 1, (batch, cfg.img_size, cfg.img_size, 3)).astype(np.float32),
              text_ids=rng.integers(0, cfg.vocab_size, (batch, text_len)).astype(np.int32),
              text_padding_mask=pad)


def _layouts(**overrides):
  loop_cfg = tiny_config(**overrides)
  scan_cfg = tiny_config(scan_layers=True, **overrides)
  params = models.init_params(loop_cfg, jax.random.key(0))
  return loop_cfg, scan_cfg, params


@pytest.mark.parametrize('overrides', [{}, PAPER], ids=['released', 'paper'])
def test_scan_layout_equals_loop_layout(overrides):
  loop_cfg, scan_cfg, params = _layouts(**overrides)
  stacked = layer_stack.to_layout(params, scan=True, num_vl_layers=loop_cfg.num_vl_layers)
  abstract = models.abstract_params(scan_cfg, boxed=False)
  assert jax.tree.structure(stacked) == jax.tree.structure(abstract)
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda a: a.shape, abstract)
  x = _inputs(loop_cfg)
  for mode in ({'images'}, {'text_ids', 'text_padding_mask'}, set(x)):
    kwargs = {k: v for k, v in x.items() if k in mode}
    want = apply(loop_cfg, params, **kwargs, return_hidden_states=True)
    got = apply(scan_cfg, stacked, **kwargs, return_hidden_states=True)
    np.testing.assert_array_equal(np.asarray(got['encoder_out']), np.asarray(want['encoder_out']))
    np.testing.assert_array_equal(np.asarray(got['hidden_states']),
                                  np.asarray(want['hidden_states']))


def test_layout_round_trip_is_exact():
  loop_cfg, _, params = _layouts(**PAPER)
  stacked = layer_stack.to_layout(params, scan=True, num_vl_layers=1)
  assert layer_stack.is_scanned(stacked) and not layer_stack.is_scanned(params)
  assert layer_stack.num_vl_layers_of(stacked) == 1
  stacked_leaf = stacked['encoder']['layers']['ffn']['A']['fc1']['kernel']
  assert stacked_leaf.shape[0] == 2          # layers 0, 1; layer 2 is in vl_layers
  back = layer_stack.to_layout(stacked, scan=False)
  assert param_tree.flatten(back).keys() == param_tree.flatten(params).keys()
  for k, v in param_tree.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(param_tree.flatten(back)[k]), np.asarray(v))
  # A model tree with the backbone under `beit3/` translates the same way.
  wrapped = layer_stack.to_layout({'beit3': params, 'head': {'kernel': np.ones(2)}}, scan=True,
                                  num_vl_layers=1)
  assert 'layers' in wrapped['beit3']['encoder'] and 'head' in wrapped


def test_scan_init_draws_each_layer_with_its_own_scale():
  """The 'beit' scheme divides layer l's output projections by sqrt(2 l), also when the layers
  are initialised inside the scan (the layer index is a traced value there)."""
  cfg = models.get_config('base', embed_dim=128, depth=4, num_heads=4, mlp_dim=256, img_size=32,
                          patch_size=8, vocab_size=300, max_text_positions=40, init='beit',
                          scan_layers=True)
  p = models.init_params(cfg, jax.random.key(0))['encoder']['layers']
  fc1 = np.asarray(p['ffn']['A']['fc1']['kernel'])
  out = np.asarray(p['self_attn']['out_proj']['A']['kernel'])
  slices = [out[i] for i in range(4)]
  assert len({float(np.std(s)) for s in slices}) == 4       # each layer drawn independently
  for i, s in enumerate(slices):
    assert abs(np.std(s) / np.std(fc1[i]) * math.sqrt(2 * (i + 1)) - 1) < 0.08, i


def test_scan_layout_decodes_with_a_cache():
  loop_cfg, scan_cfg, params = _layouts()
  stacked = layer_stack.to_layout(params, scan=True)
  x = _inputs(loop_cfg)
  outs = []
  for cfg, p in ((loop_cfg, params), (scan_cfg, stacked)):
    model = models.BEiT3(cfg)
    first = model.apply({'params': p}, images=x['images'], return_cache=True)
    step = model.apply({'params': p}, text_ids=x['text_ids'][:, :1],
                       text_positions=np.zeros((2, 1), np.int32), cache=first['new_cache'])
    assert len(step['new_cache']) == cfg.depth
    outs.append((np.asarray(step['encoder_out']), np.asarray(step['new_cache'][1]['key'])))
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-6)
  np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-6)


@pytest.mark.parametrize('scan', [False, True], ids=['loop', 'scan'])
def test_remat_policies_give_the_same_gradients(scan):
  grads = {}
  for policy in REMAT_POLICIES:
    cfg = tiny_config(scan_layers=scan, remat_policy=policy, drop_path_rate=0.1)
    params = models.init_params(tiny_config(drop_path_rate=0.1), jax.random.key(0))
    params = layer_stack.to_layout(params, scan=scan)
    model = models.BEiT3(cfg)
    x = _inputs(cfg)

    def loss(p):
      out = model.apply({'params': p}, **x, deterministic=True)['encoder_out']
      return jnp.sum(out * jnp.linspace(-1, 1, out.shape[-1]))
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for policy, g in grads.items():
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads['none'])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5,
                                 err_msg=policy)


def test_old_remat_flag_means_full():
  assert models.config.remat_policy(tiny_config(remat=True)) == 'full'
  assert models.config.remat_policy(tiny_config(remat_policy='save_qkv_proj')) == 'save_qkv_proj'
  with pytest.raises(ValueError, match='remat_policy'):
    tiny_config(remat_policy='everything')
  with pytest.raises(ValueError, match='remat=False'):
    tiny_config(remat=True, remat_policy='dots_saveable')


def test_torch_conversion_is_the_same_from_either_layout():
  loop_cfg, scan_cfg, params = _layouts(**PAPER)
  stacked = layer_stack.to_layout(params, scan=True, num_vl_layers=1)
  from_loop = convert.flax_to_torch(params, loop_cfg)
  from_scan = convert.flax_to_torch(stacked, scan_cfg)
  assert from_loop.keys() == from_scan.keys()
  for k in from_loop:
    np.testing.assert_array_equal(from_scan[k], from_loop[k])
  back = convert.torch_to_flax(from_loop, scan_cfg)
  assert layer_stack.is_scanned(back)
  for k, v in param_tree.flatten(stacked).items():
    np.testing.assert_array_equal(param_tree.flatten(back)[k], np.asarray(v))


def test_init_from_crosses_layouts(tmp_path):
  """A loop-layout params directory and training checkpoint load into a scan model, and a
  scan-layout checkpoint into a loop model."""
  loop_cfg, scan_cfg, params = _layouts(**PAPER)
  params = jax.tree.map(np.asarray, params)
  stacked = layer_stack.to_layout(params, scan=True, num_vl_layers=1)
  replicated = lambda tree: jax.tree.map(  # noqa: E731
      lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), tree)

  params_io.save_params(tmp_path / 'loop_params', params, loop_cfg)
  got, what = checkpoints.load_init_params(str(tmp_path / 'loop_params'), stacked,
                                           replicated(stacked))
  for k, v in param_tree.flatten(stacked).items():
    np.testing.assert_array_equal(np.asarray(param_tree.flatten(got)[k]), v)

  for name, tree, target in (('loop_run', params, stacked), ('scan_run', stacked, params)):
    saver = checkpoints.Checkpointer(tmp_path / name, every=1, async_save=False)
    saver.save(1, {'params': tree}, force=True)
    saver.close()
    got, what = checkpoints.load_init_params(str(tmp_path / name), target, replicated(target))
    assert 'restacked' in what, what
    for k, v in param_tree.flatten(target).items():
      np.testing.assert_array_equal(np.asarray(param_tree.flatten(got)[k]), v, err_msg=k)


def test_layer_decay_is_per_layer_in_both_layouts():
  _, _, params = _layouts(**PAPER)
  stacked = layer_stack.to_layout(params, scan=True, num_vl_layers=1)
  tx = optimizer_lib.scale_by_layer_decay(0.5, depth=3)
  ones = lambda t: jax.tree.map(jnp.ones_like, t)  # noqa: E731
  loop_scaled, _ = tx.update(ones(params), tx.init(params))
  scan_scaled, _ = tx.update(ones(stacked), tx.init(stacked))
  back = param_tree.flatten(layer_stack.to_layout(scan_scaled, scan=False))
  for k, v in param_tree.flatten(loop_scaled).items():
    np.testing.assert_allclose(np.asarray(back[k]), np.asarray(v), rtol=1e-6, err_msg=k)
  assert float(back['encoder/layers_0/ffn/A/fc1/kernel'][0, 0]) == pytest.approx(0.5 ** 3)
  assert float(back['encoder/layers_2/ffn/C/fc1/kernel'][0, 0]) == pytest.approx(0.5)


def test_bfloat16_first_moment():
  from beit3_jax.defaults import pretrain_config
  config = pretrain_config()
  config.optimizer.mu_dtype = 'bfloat16'
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 20_000, 2)
  state = tx.init({'w': jnp.ones((4, 4))})
  mus = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
      s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert mus and mus[0]['w'].dtype == jnp.bfloat16
  config.optimizer.mu_dtype = 'float16'
  with pytest.raises(ValueError, match='mu_dtype'):
    optimizer_lib.make_optimizer(config.optimizer, 20_000, 2)


def test_scanned_bfloat16_params_train():
  """Masked language modelling with scanned layers, remat and bfloat16 parameters: the state
  holds bfloat16 params, and the loss goes down on a fixed batch."""
  import train_fixtures as fx
  objective = fx.objective(streams=('text',), scan_layers=True, remat_policy='save_qkv_proj',
                           param_dtype='bfloat16', drop_path_rate=0.1)
  losses, _, _ = fx.train_objective(objective, fx.batch(0, streams=('text',)), steps=4)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  from beit3_jax.trainer import step as step_lib
  state = step_lib.abstract_state(objective, optax.adam(1e-3), jax.random.key(0))
  kernel = state.params['beit3']['encoder']['layers']['ffn']['A']['fc1']['kernel']
  assert kernel.dtype == jnp.bfloat16 and kernel.shape[0] == objective.model_cfg.depth
