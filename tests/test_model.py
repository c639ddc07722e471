"""The backbone on its own: variants, configs, dtypes, paper options, init schemes, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit3_jax import models
from beit3_jax.models import initializers
from conftest import apply, tiny_config

pytestmark = pytest.mark.usefixtures('fast_compile')   # compile-bound; no torch comparison here


def inputs(cfg, batch=2, text_len=6, seed=0):
  rng = np.random.default_rng(seed)
  return dict(
      images=jnp.asarray(rng.uniform(-1, 1, (batch, cfg.img_size, cfg.img_size, 3)), jnp.float32),
      text_ids=jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, text_len)), jnp.int32),
  )


@pytest.fixture(scope='module')
def tiny():
  cfg = tiny_config()
  return cfg, models.init_params(cfg, jax.random.key(0))


def test_released_parameter_counts():
  assert models.count_params(models.abstract_params(models.get_config('base'))) == 220_987_392
  assert models.count_params(models.abstract_params(models.get_config('large'))) == 672_702_464


def test_giant_is_the_paper_layout():
  cfg = models.get_config('giant')
  params = models.abstract_params(cfg, boxed=False)
  n = models.count_params(params)
  print(f'giant: {n:,} parameters')
  assert 1.8e9 < n < 1.95e9  # paper: 1.9B (V-FFN 692M, L-FFN 692M, VL-FFN 52M, attention 317M)
  layers = params['encoder']
  attention = sum(models.count_params(layers[f'layers_{i}']['self_attn']) for i in range(40))
  assert attention == 40 * (4 * (1408 * 1408 + 1408) + 2 * 1408)  # projections + inner LN
  vl = sum(models.count_params(layers[f'layers_{i}']['ffn'].get('C', {})) for i in range(40))
  assert vl == 3 * (2 * 1408 * 6144 + 6144 + 1408 + 2 * 6144)
  assert models.num_patches(cfg) == 256


def test_get_config_rejects_unknown_fields_and_variants():
  with pytest.raises(KeyError, match='embed_dims'):
    models.get_config('base', embed_dims=512)
  with pytest.raises(KeyError, match='huge'):
    models.get_config('huge')
  with pytest.raises(ValueError, match='num_heads'):
    models.get_config('base', num_heads=7)
  with pytest.raises(ValueError, match='init'):
    models.get_config('base', init='xavier')
  with pytest.raises(ValueError, match='position_init_std'):
    models.get_config('base', position_init_std=0.0)
  cfg = models.get_config('large', img_size=384, normalize_output=False)
  assert (cfg.embed_dim, cfg.img_size, cfg.normalize_output) == (1024, 384, False)
  with pytest.raises(AttributeError):
    cfg.embed_dimm = 3  # locked


def test_split_positions_and_output_shapes(tiny):
  cfg, params = tiny
  model = models.BEiT3(cfg)
  x = inputs(cfg)
  n = models.num_patches(cfg)
  out = apply(cfg, params, images=x['images'])
  assert out['split_position'] == -1 and out['encoder_out'].shape == (2, 1 + n, 48)
  out = apply(cfg, params, text_ids=x['text_ids'])
  assert out['split_position'] == 0 and out['encoder_out'].shape == (2, 6, 48)
  out = apply(cfg, params, **x, return_hidden_states=True)
  assert out['split_position'] == 1 + n
  assert out['encoder_out'].shape == (2, 1 + n + 6, 48)
  assert out['hidden_states'].shape == (cfg.depth + 1, 2, 1 + n + 6, 48)
  assert out['encoder_out'].dtype == jnp.float32


def test_output_structure_does_not_depend_on_flags(tiny):
  cfg, params = tiny
  x = inputs(cfg)
  keys = {'encoder_out', 'split_position', 'hidden_states', 'new_cache'}
  plain = apply(cfg, params, **x)
  assert set(plain) == keys and plain['hidden_states'] is None and plain['new_cache'] is None
  hidden = apply(cfg, params, **x, return_hidden_states=True)
  assert set(hidden) == keys and hidden['new_cache'] is None
  cached = apply(cfg, params, text_ids=x['text_ids'], return_cache=True)
  assert set(cached) == keys and cached['hidden_states'] is None
  assert len(cached['new_cache']) == cfg.depth
  assert set(cached['new_cache'][0]) == {'key', 'value'}


def test_pretraining_output_structure_does_not_depend_on_inputs():
  from beit3_jax.models.pretraining import BEiT3Pretraining, pretraining_example_inputs
  cfg = tiny_config()
  model = BEiT3Pretraining(cfg, 16)
  params = jax.jit(lambda r: model.init(r, **pretraining_example_inputs(cfg)))(
      jax.random.key(0))['params']
  x = inputs(cfg)
  index = jnp.zeros((2, 3), jnp.int32)
  fn = jax.jit(lambda p, a: model.apply({'params': p}, **a))
  keys = {'encoder_out', 'mim_logits', 'mlm_logits'}
  image = fn(params, dict(images=x['images'], image_index=index))
  assert set(image) == keys and image['mlm_logits'] is None
  assert image['mim_logits'].shape == (2, 3, 16) and image['mim_logits'].dtype == jnp.float32
  text = fn(params, dict(text_ids=x['text_ids'], text_index=index))
  assert set(text) == keys and text['mim_logits'] is None
  assert text['mlm_logits'].shape == (2, 3, cfg.vocab_size)


def test_routing_compiles_at_most_three_variants(tiny):
  cfg, params = tiny
  model = models.BEiT3(cfg)
  forward = jax.jit(lambda p, a: model.apply({'params': p}, **a)['encoder_out'])
  x = inputs(cfg)
  for _ in range(2):
    for kwargs in (dict(images=x['images']), dict(text_ids=x['text_ids']), x):
      forward(params, kwargs)
  assert forward._cache_size() == 3


def test_bfloat16_forward_close_to_float32(tiny):
  cfg, params = tiny
  x = inputs(cfg)
  pad = jnp.zeros((2, 6), bool).at[1, 4:].set(True)
  out32 = apply(cfg, params, **x, text_padding_mask=pad)['encoder_out']
  cfg16 = tiny_config(dtype='bfloat16')
  out16 = apply(cfg16, params, **x, text_padding_mask=pad)['encoder_out']
  assert out16.dtype == jnp.bfloat16
  out16 = out16.astype(jnp.float32)
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel <= 1e-2, rel


def test_all_padding_text_row_is_finite_and_isolated(tiny):
  cfg, params = tiny
  model = models.BEiT3(cfg)
  ids = inputs(cfg)['text_ids']
  pad = jnp.zeros((2, 6), bool).at[1].set(True)  # row 1 is all padding
  out = apply(cfg, params, text_ids=ids, text_padding_mask=pad)['encoder_out']
  assert bool(jnp.isfinite(out).all())
  alone = apply(cfg, params, text_ids=ids[:1], text_padding_mask=pad[:1])
  np.testing.assert_allclose(out[0], alone['encoder_out'][0], atol=1e-6)


def test_padding_hides_padded_tokens(tiny):
  """Changing the ids under padding changes nothing at the real positions."""
  cfg, params = tiny
  model = models.BEiT3(cfg)
  x = inputs(cfg)
  pad = jnp.zeros((2, 6), bool).at[:, 4:].set(True)
  other = x['text_ids'].at[:, 4:].set(7)
  a = apply(cfg, params, **x, text_padding_mask=pad)['encoder_out']
  b = apply(cfg, params, images=x['images'], text_ids=other,
                  text_padding_mask=pad)['encoder_out']
  real = 1 + models.num_patches(cfg) + 4
  np.testing.assert_allclose(a[:, :real], b[:, :real], atol=1e-6)


def test_attn_mask_bool_and_int_agree_and_block(tiny):
  cfg, params = tiny
  model = models.BEiT3(cfg)
  x = inputs(cfg)
  s = 1 + models.num_patches(cfg) + 6
  causal = np.triu(np.ones((s, s), np.int32), 1)
  a = apply(cfg, params, **x, attn_mask=causal)['encoder_out']
  b = apply(cfg, params, **x, attn_mask=causal.astype(bool))['encoder_out']
  np.testing.assert_array_equal(a, b)
  # Under a causal mask the last text token cannot influence earlier positions.
  changed = x['text_ids'].at[:, -1].set((x['text_ids'][:, -1] + 1) % cfg.vocab_size)
  c = apply(cfg, params, images=x['images'], text_ids=changed,
                  attn_mask=causal)['encoder_out']
  np.testing.assert_allclose(a[:, :-1], c[:, :-1], atol=1e-6)
  assert not np.allclose(a[:, -1], c[:, -1], atol=1e-4)


def test_drop_path_uses_its_rng_and_is_off_when_deterministic():
  cfg = tiny_config(drop_path_rate=0.5)
  params = models.init_params(cfg, jax.random.key(0))
  model = models.BEiT3(cfg)
  x = inputs(cfg, batch=8)
  det = apply(cfg, params, **x)['encoder_out']
  with pytest.raises(Exception, match='drop_path'):
    apply(cfg, params, **x, deterministic=False)
  one = apply(cfg, params, **x, deterministic=False,
                    rngs={'drop_path': jax.random.key(1)})['encoder_out']
  again = apply(cfg, params, **x, deterministic=False,
                      rngs={'drop_path': jax.random.key(1)})['encoder_out']
  np.testing.assert_array_equal(one, again)
  assert not np.allclose(one, det)


def test_remat_gives_the_same_values_and_gradients(tiny):
  cfg, params = tiny
  x = inputs(cfg)

  def value_and_grad(c):
    loss = lambda p: jnp.sum(models.BEiT3(c).apply({'params': p}, **x)['encoder_out'] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  v0, g0 = value_and_grad(cfg)
  v1, g1 = value_and_grad(tiny_config(remat=True))
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


# ------------------------------------------------------------------ paper options


def test_vl_expert_moves_only_image_text_outputs_of_its_layers():
  cfg = tiny_config(depth=3, num_vl_layers=1)
  params = models.init_params(cfg, jax.random.key(0))
  top = params['encoder']['layers_2']
  assert set(top['ffn']) == {'A', 'B', 'C'} and set(top['final_layer_norm']) == {'A', 'B', 'C'}
  assert 'C' not in params['encoder']['layers_1']['ffn']
  changed = jax.tree.map(lambda a: a, params)
  changed['encoder']['layers_2']['ffn']['C'] = jax.tree.map(
      lambda a: a + 0.5, params['encoder']['layers_2']['ffn']['C'])
  model = models.BEiT3(cfg)
  x = inputs(cfg)
  for kwargs in (dict(images=x['images']), dict(text_ids=x['text_ids'])):
    a = apply(cfg, params, **kwargs, return_hidden_states=True)
    b = apply(cfg, changed, **kwargs, return_hidden_states=True)
    np.testing.assert_array_equal(a['hidden_states'], b['hidden_states'])
  a = apply(cfg, params, **x, return_hidden_states=True)
  b = apply(cfg, changed, **x, return_hidden_states=True)
  np.testing.assert_array_equal(a['hidden_states'][:3], b['hidden_states'][:3])
  assert np.abs(a['hidden_states'][3] - b['hidden_states'][3]).min() > 0  # every token moved


def test_shared_attention_has_one_projection_set():
  cfg = tiny_config(shared_attention=True)
  params = models.init_params(cfg, jax.random.key(0))
  attn = params['encoder']['layers_0']['self_attn']
  assert set(attn) == {'q_proj', 'k_proj', 'v_proj', 'out_proj', 'inner_attn_ln'}
  assert set(attn['q_proj']) == {'kernel', 'bias'}
  assert set(params['encoder']['layers_0']['self_attn_layer_norm']) == {'scale', 'bias'}
  assert set(params['encoder']['layers_0']['ffn']) == {'A', 'B'}  # FFN experts stay
  decoupled = models.count_params(models.abstract_params(tiny_config()))
  d = cfg.embed_dim
  saved = cfg.depth * (4 * (d * d + d) + 2 * 2 * d)
  assert models.count_params(params) == decoupled - saved
  out = apply(cfg, params, **inputs(cfg))['encoder_out']
  assert bool(jnp.isfinite(out).all())


def _init_stats_config(scheme, **overrides):
  return models.get_config('base', embed_dim=128, depth=4, num_heads=4, mlp_dim=256,
                           img_size=32, patch_size=8, vocab_size=300, max_text_positions=40,
                           init=scheme, **overrides)


def _std(x):
  return float(np.std(np.asarray(x)))


def test_init_unilm_statistics():
  cfg = _init_stats_config('unilm')
  p = models.init_params(cfg, jax.random.key(0))
  layer = p['encoder']['layers_1']
  expect = 0.02 * initializers.TRUNCATED_NORMAL_1SD_STD
  for kernel in (layer['self_attn']['q_proj']['A']['kernel'], layer['ffn']['B']['fc2']['kernel'],
                 layer['self_attn']['out_proj']['B']['kernel']):
    assert float(jnp.abs(kernel).max()) <= 0.02
    assert abs(_std(kernel) / expect - 1) < 0.05
  assert float(jnp.abs(layer['ffn']['A']['fc1']['bias']).max()) == 0.0
  np.testing.assert_array_equal(layer['final_layer_norm']['A']['scale'], 1.0)
  np.testing.assert_array_equal(p['vision_embed']['cls_token'], 0.0)
  assert abs(_std(p['text_embed']['embedding']) * math.sqrt(128) - 1) < 0.05
  assert abs(_std(p['encoder']['embed_positions']['B']['embedding']) - 1) < 0.05


def test_init_torchscale_statistics():
  cfg = _init_stats_config('torchscale')
  p = models.init_params(cfg, jax.random.key(0))
  layer = p['encoder']['layers_2']
  gamma = math.sqrt(math.log(2 * 4))
  uniform_std = lambda fan_in, gain=1.0: gain / math.sqrt(3 * fan_in)
  assert abs(_std(layer['self_attn']['q_proj']['A']['kernel']) / uniform_std(128) - 1) < 0.05
  assert abs(_std(layer['self_attn']['k_proj']['B']['kernel']) / uniform_std(128) - 1) < 0.05
  assert abs(_std(layer['self_attn']['v_proj']['A']['kernel']) / uniform_std(128, gamma) - 1) < 0.05
  assert abs(_std(layer['self_attn']['out_proj']['A']['kernel']) / uniform_std(128, gamma) - 1) < 0.05
  assert abs(_std(layer['ffn']['A']['fc1']['kernel']) / uniform_std(128, gamma) - 1) < 0.05
  assert abs(_std(layer['ffn']['B']['fc2']['kernel']) / uniform_std(256, gamma) - 1) < 0.05
  fc1_bias = layer['ffn']['A']['fc1']['bias']
  assert 0 < float(jnp.abs(fc1_bias).max()) <= gamma / math.sqrt(128)
  assert float(jnp.abs(layer['self_attn']['q_proj']['A']['bias']).max()) <= 1 / math.sqrt(128)


def test_init_beit_rescales_output_projections_by_layer():
  cfg = _init_stats_config('beit', position_init_std=0.02)
  p = models.init_params(cfg, jax.random.key(0))
  for table in 'AB':  # position_init_std replaces torchscale's N(0, 1) in both tables
    assert abs(_std(p['encoder']['embed_positions'][table]['embedding']) / 0.02 - 1) < 0.05
  for i in range(4):
    layer = p['encoder'][f'layers_{i}']
    base = _std(layer['ffn']['A']['fc1']['kernel'])
    for kernel in (layer['self_attn']['out_proj']['A']['kernel'], layer['ffn']['B']['fc2']['kernel']):
      assert abs(_std(kernel) / base * math.sqrt(2 * (i + 1)) - 1) < 0.08, i
      assert float(jnp.abs(kernel).max()) <= 0.02 / math.sqrt(2 * (i + 1)) + 1e-9
    assert abs(_std(layer['self_attn']['q_proj']['A']['kernel']) / base - 1) < 0.08


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize('bad, match', [
    (dict(images=jnp.zeros((1, 48, 48, 3))), 'img_size=32'),
    (dict(images=jnp.zeros((1, 3, 32, 32))), 'NHWC'),
    (dict(text_ids=jnp.zeros((1, 23), jnp.int32)), 'at most 22 tokens'),
    (dict(text_ids=jnp.zeros((1, 5), jnp.float32)), 'integer'),
    (dict(text_ids=jnp.zeros((1, 5), jnp.int32), text_padding_mask=jnp.zeros((1, 4), bool)),
     'text_padding_mask'),
    (dict(images=jnp.zeros((2, 32, 32, 3)), text_ids=jnp.zeros((3, 5), jnp.int32)), 'batch'),
    (dict(images=jnp.zeros((1, 32, 32, 3)), image_mask=jnp.zeros((1, 15), bool)), 'image_mask'),
    (dict(images=jnp.zeros((1, 32, 32, 3)), attn_mask=np.zeros((16, 16))), r'\(17, 17\)'),
    (dict(), 'images, text_ids or both'),
])
def test_bad_input_gets_a_clear_error(tiny, bad, match):
  cfg, params = tiny
  with pytest.raises(ValueError, match=match):
    apply(cfg, params, **bad)


def test_init_needs_both_modalities():
  cfg = tiny_config()
  with pytest.raises(ValueError, match='both images and text_ids'):
    models.BEiT3(cfg).init(jax.random.key(0), images=jnp.zeros((1, 32, 32, 3)))
