"""Tests of the VQ-KD visual tokenizer (beit3_jax.tokenizers): config, layout, parity with
transformers' BeitModel, the codebook lookup, conversion both ways, sharding and grid matching.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from beit3_jax import param_tree, sharding
from beit3_jax.torch_layout import ConversionError, Report
from beit3_jax.models import count_params
from beit3_jax.models.positions import resize_grid_bicubic
from beit3_jax.tokenizers import (VQKD, abstract_variables, example_images, get_vqkd_config,
                                  load_vqkd_torch, resize_pos_embed, save_vqkd_torch, token_grid,
                                  tokenizer_view_size, vqkd_flax_to_torch, vqkd_torch_to_flax)
from beit3_jax.tokenizers import convert as vqkd_convert

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_dim=96,
            n_embed=64, code_dim=8, decoder_embed_dim=48, decoder_depth=1,
            decoder_num_heads=4, decoder_mlp_dim=96, decoder_out_dim=24)
SKIPPED = ('teacher_model.visual.proj', 'scaling_layer.shift', 'loss_fn.y')


def tiny(**overrides):
  return get_vqkd_config('base', **{**TINY, **overrides})


def apply_fn(cfg, method):
  """jit of VQKD(cfg).apply({'params': p}, x, method=method)."""
  model = VQKD(cfg)
  return jax.jit(lambda p, x: model.apply({'params': p}, x, method=method))


def random_state_dict(cfg, seed=0) -> dict:
  """A state dict in beit2's VQKD layout of random float32 tensors with the shapes `cfg` expects."""
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(shape).astype(np.float32)
          for k, shape in vqkd_convert.expected_torch_shapes(cfg).items()}


def plausible_params(cfg, seed=0):
  """Tokenizer params converted from a random beit2-layout state dict at init-like scales (no jit init).

  LayerNorms 1 + N(0, 0.1) / N(0, 0.1), the codebook unit rows, tokens and positions
  N(0, 0.5), every other tensor N(0, 0.1).
  """
  sd = random_state_dict(cfg, seed)
  for k, v in sd.items():
    if k.endswith(('norm1.weight', 'norm2.weight', 'fc_norm.weight')):
      sd[k] = 1 + 0.1 * v
    elif k == 'quantize.embedding.weight':
      sd[k] = unit_rows(v).astype(np.float32)
    elif k.endswith(('cls_token', 'pos_embed')):
      sd[k] = 0.5 * v
    else:
      sd[k] = 0.1 * v
  return vqkd_torch_to_flax(sd, cfg)[0]


def random_images(cfg, batch, seed=0, size=None):
  s = size or cfg.input_size
  return np.random.default_rng(seed).uniform(-1, 1, (batch, s, s, 3)).astype(np.float32)


def unit_rows(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def top2_margin(z, codebook) -> float:
  """Smallest (best - second best) cosine over all rows of z, in float64."""
  sims = unit_rows(np.asarray(z, np.float64).reshape(-1, z.shape[-1])) @ unit_rows(
      np.asarray(codebook, np.float64)).T
  top = np.sort(sims, axis=-1)
  return float(np.min(top[:, -1] - top[:, -2]))


def codebook_with_margin(z, n_embed, seed, margin=1e-4):
  """Unit-norm float32 codes (n_embed, code_dim) whose top-2 cosines to every z differ > margin."""
  rng = np.random.default_rng(seed)
  for _ in range(100):
    codebook = unit_rows(rng.standard_normal((n_embed, z.shape[-1]))).astype(np.float32)
    if top2_margin(z, codebook) > margin:
      return codebook
  raise AssertionError('no codebook with the margin found')


def numpy_nearest_code(z, codebook):
  """beit2's lookup in float64: argmin_k |z/|z| - e_k|^2 over the stored codes."""
  zn = unit_rows(np.asarray(z, np.float64))
  e = np.asarray(codebook, np.float64)
  d = (zn ** 2).sum(-1, keepdims=True) + (e ** 2).sum(-1) - 2 * zn @ e.T
  return np.argmin(d, axis=-1)


def with_codebook(params, codebook):
  params = jax.tree.map(lambda x: x, params)  # copies the dict structure
  params['quantize']['embedding']['embedding'] = jnp.asarray(codebook)
  return params


@pytest.fixture(scope='module')
def tiny_setup():
  cfg = tiny()
  return cfg, plausible_params(cfg)


# ----------------------------------------------------------------------------- config


def test_config_variants_and_errors():
  base = get_vqkd_config()
  assert (base.img_size, base.input_size, base.patch_size, base.embed_dim, base.depth,
          base.num_heads, base.mlp_dim, base.layernorm_eps) == (224, 224, 16, 768, 12, 12,
                                                                3072, 1e-6)
  assert (base.n_embed, base.code_dim, base.decoder_depth, base.decoder_out_dim) == (
      8192, 32, 3, 512)
  large = get_vqkd_config('large')
  assert (large.embed_dim, large.depth, large.num_heads, large.mlp_dim) == (1024, 24, 16, 4096)
  assert get_vqkd_config('vqkd_encoder_base_decoder_1x768x12_clip').decoder_depth == 1
  assert get_vqkd_config('vqkd_encoder_base_decoder_1x768x12_dino').decoder_out_dim == 768
  assert get_vqkd_config(img_size=256).input_size == 256
  with pytest.raises(KeyError, match='decoder_layers'):
    get_vqkd_config(decoder_layers=1)
  with pytest.raises(KeyError, match='huge'):
    get_vqkd_config('huge')
  with pytest.raises(ValueError, match='input_size'):
    get_vqkd_config(input_size=250)
  with pytest.raises(ValueError, match='num_heads'):
    get_vqkd_config(num_heads=7)
  with pytest.raises(AttributeError):
    base.new_field = 1  # locked


def test_base_layout_matches_the_released_keys():
  """Every beit2 key of vqkd_encoder_base_decoder_3x768x12_clip, with its shape; parameter count."""
  cfg = get_vqkd_config()
  shapes = vqkd_convert.expected_torch_shapes(cfg)
  block = {'norm1.weight': (768,), 'norm1.bias': (768,), 'attn.q_bias': (768,),
           'attn.v_bias': (768,), 'attn.qkv.weight': (2304, 768),
           'attn.proj.weight': (768, 768), 'attn.proj.bias': (768,), 'norm2.weight': (768,),
           'norm2.bias': (768,), 'mlp.fc1.weight': (3072, 768), 'mlp.fc1.bias': (3072,),
           'mlp.fc2.weight': (768, 3072), 'mlp.fc2.bias': (768,)}
  want = {
      'encoder.cls_token': (1, 1, 768), 'encoder.pos_embed': (1, 197, 768),
      'encoder.patch_embed.proj.weight': (768, 3, 16, 16),
      'encoder.patch_embed.proj.bias': (768,),
      'encoder.fc_norm.weight': (768,), 'encoder.fc_norm.bias': (768,),
      'decoder.cls_token': (1, 1, 768), 'decoder.pos_embed': (1, 197, 768),
      'decoder.patch_embed.proj.weight': (768, 32, 1, 1),
      'decoder.patch_embed.proj.bias': (768,),
      'decoder.fc_norm.weight': (768,), 'decoder.fc_norm.bias': (768,),
      'quantize.embedding.weight': (8192, 32), 'quantize.embedding.cluster_size': (8192,),
      'quantize.embedding.embed_avg': (8192, 32), 'quantize.embedding.initted': (1,),
      'quantize.cluster_size': (8192,),
      'encode_task_layer.0.weight': (768, 768), 'encode_task_layer.0.bias': (768,),
      'encode_task_layer.2.weight': (32, 768), 'encode_task_layer.2.bias': (32,),
      'decode_task_layer.0.weight': (768, 768), 'decode_task_layer.0.bias': (768,),
      'decode_task_layer.2.weight': (512, 768), 'decode_task_layer.2.bias': (512,),
  }
  for part, depth in (('encoder', 12), ('decoder', 3)):
    for i in range(depth):
      want.update({f'{part}.blocks.{i}.{k}': s for k, s in block.items()})
  assert shapes == want
  params, vq_stats = abstract_variables(cfg)
  assert count_params(params) == 109_091_360
  assert set(vq_stats) == {'quantize'} and count_params(vq_stats) == 8192 * 34 + 1


def test_every_variable_has_logical_axis_names():
  cfg = tiny()
  model = VQKD(cfg)
  boxed = jax.eval_shape(lambda r: model.init(r, example_images(cfg)), jax.random.key(0))
  names = {n for n, _ in sharding.LOGICAL_RULES}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape)
    assert {n for n in x.names if n is not None} <= names


# ----------------------------------------------------------------------------- parity


def hf_to_vqkd_encoder(hf: dict, depth: int) -> dict:
  """transformers BeitModel (use_mean_pooling) weights -> beit2's `encoder.*` keys."""
  out = {'encoder.cls_token': hf['embeddings.cls_token'],
         'encoder.pos_embed': hf['embeddings.position_embeddings'],
         'encoder.patch_embed.proj.weight': hf['embeddings.patch_embeddings.projection.weight'],
         'encoder.patch_embed.proj.bias': hf['embeddings.patch_embeddings.projection.bias'],
         'encoder.fc_norm.weight': hf['pooler.layernorm.weight'],
         'encoder.fc_norm.bias': hf['pooler.layernorm.bias']}
  for i in range(depth):
    src, dst = f'layers.{i}.', f'encoder.blocks.{i}.'
    attn = src + 'attention.'
    out.update({
        dst + 'attn.qkv.weight': np.concatenate(
            [hf[attn + f'{n}_proj.weight'] for n in 'qkv'], axis=0),  # k_proj has no bias
        dst + 'attn.q_bias': hf[attn + 'q_proj.bias'],
        dst + 'attn.v_bias': hf[attn + 'v_proj.bias'],
        dst + 'attn.proj.weight': hf[attn + 'o_proj.weight'],
        dst + 'attn.proj.bias': hf[attn + 'o_proj.bias'],
    })
    for ours, theirs in (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after'),
                         ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')):
      for leaf in ('weight', 'bias'):
        out[f'{dst}{ours}.{leaf}'] = hf[f'{src}{theirs}.{leaf}']
  return out


def test_encoder_features_match_transformers_beit():
  from transformers import BeitConfig, BeitModel
  cfg = tiny()
  hf_cfg = BeitConfig(
      image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=3,
      hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim, hidden_act='gelu', layer_norm_eps=1e-6,
      use_absolute_position_embeddings=True, use_relative_position_bias=False,
      use_shared_relative_position_bias=False, layer_scale_init_value=0.0,
      use_mean_pooling=True, use_mask_token=False, attn_implementation='eager')
  torch.manual_seed(0)
  hf_model = BeitModel(hf_cfg, add_pooling_layer=True).eval()
  assert not any('lambda' in k for k in hf_model.state_dict())  # no layer scale
  rng = np.random.default_rng(1)
  with torch.no_grad():  # HF init has LNs at 1/0, zero biases, tokens and positions
    for name, p in hf_model.named_parameters():
      noise = torch.from_numpy(rng.standard_normal(tuple(p.shape)).astype(np.float32))
      if 'layernorm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith(('cls_token', 'position_embeddings')):
        p.copy_(0.5 * noise)
      else:
        p.copy_(0.15 * noise)
  hf = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  state_dict = {**random_state_dict(cfg), **hf_to_vqkd_encoder(hf, cfg.depth)}
  params, _ = vqkd_torch_to_flax(state_dict, cfg)

  images = random_images(cfg, 2)
  ours = np.asarray(apply_fn(cfg, VQKD.encoder_features)(params, images))
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    ref = hf_model.pooler.layernorm(out.last_hidden_state[:, 1:]).numpy()  # per token
  assert ours.shape == ref.shape == (2, 16, cfg.embed_dim)
  assert np.abs(ref).max() > 0.5
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_token_ids_match_numpy_nearest_code(tiny_setup):
  cfg, params = tiny_setup
  images = random_images(cfg, 4, seed=2)
  z = np.asarray(apply_fn(cfg, VQKD.code_features)(params, images))
  assert z.shape == (4, 16, cfg.code_dim) and z.dtype == np.float32
  codebook = codebook_with_margin(z, cfg.n_embed, seed=3)
  assert top2_margin(z, codebook) > 1e-4
  ids = np.asarray(apply_fn(cfg, VQKD.encode)(with_codebook(params, codebook), images))
  want = numpy_nearest_code(z, codebook)
  assert ids.dtype == np.int32 and ids.shape == (4, 16)
  assert len(np.unique(want)) > 4
  np.testing.assert_array_equal(ids, want)


def test_training_pass_shapes_and_codes(tiny_setup):
  cfg, params = tiny_setup
  images = random_images(cfg, 2, seed=4)
  out = jax.jit(lambda p, x: VQKD(cfg).apply({'params': p}, x))(params, images)
  assert out['ids'].shape == (2, 16)
  assert out['rec'].shape == (2, 16, cfg.decoder_out_dim) and out['rec'].dtype == jnp.float32
  codes = np.asarray(params['quantize']['embedding']['embedding'])[np.asarray(out['ids'])]
  np.testing.assert_allclose(out['z_q'], codes, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out['z'], axis=-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- conversion


def test_import_export_is_bitwise_and_skips_teacher_keys():
  cfg = tiny()
  sd = random_state_dict(cfg, seed=5)
  extra = {k: np.ones((3,), np.float32) for k in SKIPPED}
  report = Report()
  params, vq_stats = vqkd_torch_to_flax({'model': {**sd, **extra}}, cfg, report)
  assert sorted(report.skipped) == sorted(SKIPPED)
  assert report.converted == len(sd)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  assert sorted(param_tree.flatten(vq_stats)) == [
      'quantize/cluster_size', 'quantize/embedding/cluster_size',
      'quantize/embedding/embed_avg', 'quantize/embedding/initted']
  np.testing.assert_array_equal(params['quantize']['embedding']['embedding'],
                                sd['quantize.embedding.weight'])
  back = vqkd_flax_to_torch(params, vq_stats, cfg)
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert np.array_equal(back[k], v), k


def test_checkpoint_files_round_trip(tmp_path):
  cfg = tiny()
  sd = random_state_dict(cfg, seed=10)
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / 'beit2.pth')
  params, vq_stats = load_vqkd_torch(str(tmp_path / 'beit2.pth'), cfg)
  for name in ('out.pth', 'out.safetensors'):
    save_vqkd_torch(str(tmp_path / name), params, vq_stats, cfg)
    back = vqkd_flax_to_torch(*load_vqkd_torch(str(tmp_path / name), cfg), cfg)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  assert set(torch.load(tmp_path / 'out.pth', weights_only=True)) == {'model'}


def test_conversion_errors_name_every_bad_key():
  cfg = tiny()
  sd = random_state_dict(cfg, seed=6)
  del sd['encoder.blocks.1.attn.v_bias']
  sd['quantize.embedding.weight'] = np.zeros((65, 8), np.float32)
  sd['decoder.blocks.1.norm1.weight'] = np.ones((48,), np.float32)  # a 2-layer decoder's key
  with pytest.raises(ConversionError) as e:
    vqkd_torch_to_flax(sd, cfg)
  msg = str(e.value)
  assert 'missing (1): encoder.blocks.1.attn.v_bias' in msg
  assert 'quantize.embedding.weight (65, 8) (expected (64, 8))' in msg
  assert 'unexpected (1): decoder.blocks.1.norm1.weight' in msg
  assert 'decoder depth=2' in msg

  params, vq_stats = vqkd_torch_to_flax(random_state_dict(cfg), cfg)
  del vq_stats['quantize']['embedding']['initted']
  with pytest.raises(ConversionError, match='missing.*quantize/embedding/initted'):
    vqkd_flax_to_torch(params, vq_stats, cfg)


# ----------------------------------------------------------------------------- sharding


def test_sharded_encode_equals_single_device(eight_devices):
  cfg = tiny()
  model = VQKD(cfg)
  mesh = sharding.make_mesh((2, 2, 2))
  # Born sharded; `method=encode` initialises what encoding uses (not the decoder).
  variables = sharding.init_sharded(
      lambda r: model.init(r, example_images(cfg, 8), method=VQKD.encode), mesh,
      jax.random.key(1))
  params = variables['params']
  assert set(params) == {'encoder', 'encode_task_layer', 'quantize'}
  assert params['encoder']['blocks_0']['mlp']['fc1']['kernel'].sharding.spec == P(
      'fsdp', 'tensor')
  stats = variables['vq_stats']['quantize']
  assert stats['embedding']['embed_avg'].sharding.spec == P('tensor', None)
  codebook = np.asarray(params['quantize']['embedding']['embedding'])
  np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(stats['embedding']['embed_avg'], codebook)
  assert not np.any(stats['cluster_size']) and not np.any(stats['embedding']['cluster_size'])
  np.testing.assert_array_equal(stats['embedding']['initted'], [1.0])
  images = random_images(cfg, 8, seed=7)
  local = jax.device_get(params)
  z = np.asarray(apply_fn(cfg, VQKD.code_features)(local, images))
  local = with_codebook(local, codebook_with_margin(z, cfg.n_embed, seed=8))
  params = with_codebook(params, jax.device_put(
      local['quantize']['embedding']['embedding'],
      params['quantize']['embedding']['embedding'].sharding))
  single = np.asarray(apply_fn(cfg, VQKD.encode)(local, images))

  with sharding.use_mesh(mesh):
    x = jax.device_put(images, NamedSharding(mesh, P(('data', 'fsdp'))))
    ids = apply_fn(cfg, VQKD.encode)(params, x)
    feats = apply_fn(cfg, VQKD.encoder_features)(params, x)
  assert ids.sharding.spec[0] == ('data', 'fsdp')
  np.testing.assert_array_equal(np.asarray(ids), single)
  np.testing.assert_allclose(np.asarray(feats),
                             apply_fn(cfg, VQKD.encoder_features)(local, images), atol=1e-5)


# ----------------------------------------------------------------------------- grid matching


def test_tokenizer_view_size_rule():
  assert tokenizer_view_size(16, 16) == 256   # giant: patch 14 at 224 -> 16 x 16
  assert tokenizer_view_size(14, 16) == 224   # base/large at 224: the tokenizer's own view
  assert tokenizer_view_size((16, 12), 16) == (256, 192)
  for bad in (0, 2.5, (4, 0)):
    with pytest.raises(ValueError):
      tokenizer_view_size(bad, 16)
  cfg = get_vqkd_config(input_size=tokenizer_view_size(16, 16))
  assert token_grid(cfg) == (16, 16)
  params, _ = abstract_variables(cfg)
  assert params['encoder']['pos_embed'].shape == (1, 197, 768)  # the checkpoint's table


def test_resized_view_with_exact_pos_resize_uses_the_exact_size_rule(tiny_setup):
  # BEiT v2's own rule, the default, is checked against torch in test_vqkd_resize.py.
  _, params = tiny_setup
  pos = np.asarray(params['encoder']['pos_embed'])                       # (1, 17, 48): 4 x 4
  resized = np.asarray(jax.jit(lambda p: resize_pos_embed(p, (5, 5), 'exact'))(pos))
  assert resized.shape == (1, 26, 48)
  want = resize_grid_bicubic(pos[0, 1:].reshape(4, 4, 48), (5, 5)).reshape(1, 25, 48)
  np.testing.assert_array_equal(resized[:, :1], pos[:, :1])
  np.testing.assert_allclose(resized[:, 1:], want, rtol=0, atol=1e-6)
  assert resize_pos_embed(pos, (4, 4), 'exact') is pos

  # A 40 px view (5 x 5 tokens) equals a model built for 40 px with the resized table.
  view = tiny(input_size=40, pos_resize='exact')
  images = random_images(view, 2, seed=9)
  ids = apply_fn(view, VQKD.encode)(params, images)
  assert ids.shape == (2, 25) and token_grid(view) == (5, 5)
  feats = apply_fn(view, VQKD.encoder_features)(params, images)
  native = jax.tree.map(lambda x: x, params)
  native['encoder']['pos_embed'] = jnp.asarray(
      np.concatenate([pos[:, :1], want], axis=1).astype(np.float32))
  np.testing.assert_allclose(
      feats, apply_fn(tiny(img_size=40), VQKD.encoder_features)(native, images), atol=1e-5)
  with pytest.raises(ValueError, match='input_size=40'):
    apply_fn(view, VQKD.encode)(params, random_images(view, 1, size=32))


def test_convert_cli_round_trips_a_tokenizer_checkpoint(tmp_path, capsys):
  """python -m beit3_jax.convert to-flax --model vqkd, then to-torch: bitwise, teacher skipped."""
  import torch
  from beit3_jax import convert as cli
  from beit3_jax import params_io
  cfg = tiny()
  state = random_state_dict(cfg, seed=3)
  with_teacher = {**state, 'teacher.proj': np.ones(3, np.float32)}
  src, out_dir, back = tmp_path / 'in.pth', tmp_path / 'flax', tmp_path / 'back.safetensors'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in with_teacher.items()}}, src)
  sets = [a for k, v in TINY.items() for a in ('--set', f'{k}={v}')]
  assert cli.main(['to-flax', str(src), str(out_dir), '--model', 'vqkd', '--variant', 'base',
                   *sets]) == 0
  printed = capsys.readouterr().out
  assert '(vqkd)' in printed and 'teacher.proj' in printed
  assert params_io.read_kind(out_dir) == 'vqkd'
  with pytest.raises(ValueError, match='vqkd'):
    params_io.load_params(out_dir)
  assert cli.main(['to-torch', str(out_dir), str(back)]) == 0  # the kind comes from config.json
  restored = cli.load_state_dict(str(back))
  assert set(restored) == set(state)
  for k, v in state.items():
    assert np.array_equal(restored[k], v), k
