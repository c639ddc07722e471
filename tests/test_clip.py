"""The CLIP vision tower: parity with transformers and with an OpenAI-layout TorchScript archive,
the converter CLI, and tokenizer training with a CLIP teacher."""

import collections
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from beit3_jax import sharding
from beit3_jax.defaults import tokenizer_config
from beit3_jax.jobs.tokenizer_training import Teacher, VQKDTraining
from beit3_jax.tokenizers import clip, clip_convert, get_vqkd_config
from beit3_jax.torch_files import TorchScriptError, load_torchscript_state_dict
from beit3_jax.torch_layout import ConversionError
from beit3_jax.trainer import step as step_lib
from beit3_jax.trainer.optimizer import make_optimizer
import train_fixtures as fx

# torch.jit.script/save are deprecated in torch 2.13; OpenAI's release is such an archive.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')

WIDTH, LAYERS, HEADS, PATCH, SIZE, PROJ = 64, 2, 4, 8, 32, 16


def _hf_model(with_projection: bool):
  config = transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, patch_size=PATCH, image_size=SIZE, projection_dim=PROJ)
  torch.manual_seed(0)
  cls = (transformers.CLIPVisionModelWithProjection if with_projection
         else transformers.CLIPVisionModel)
  model = cls(config).eval()
  with torch.no_grad():   # larger than the 0.02 init, so that every weight matters
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _images(seed=0, b=2):
  return np.random.default_rng(seed).normal(size=(b, SIZE, SIZE, 3)).astype(np.float32)


def _tower(config):
  """The tower's outputs as a jitted function of (params, images)."""
  return jax.jit(lambda p, x: clip.ClipVisionTower(config).apply({'params': p}, x))


def _apply(params, config, images):
  return jax.device_get(_tower(config)(params, jnp.asarray(images)))


def test_matches_transformers_from_safetensors_bin_and_directory(tmp_path):
  images = _images()
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  with_proj = _hf_model(True)
  plain = transformers.CLIPVisionModel(with_proj.config).eval()
  plain.load_state_dict(with_proj.vision_model.state_dict())
  with torch.no_grad():
    ref = with_proj.vision_model(pixel_values=pixels)
    embeds = with_proj(pixel_values=pixels).image_embeds.numpy()
    ref_plain = plain(pixel_values=pixels)

  save_file(with_proj.state_dict(), str(tmp_path / 'with_proj.safetensors'))
  params, config = clip_convert.load_clip_torch(str(tmp_path / 'with_proj.safetensors'),
                                                heads=HEADS)
  assert (config.width, config.layers, config.heads, config.patch_size, config.image_size,
          config.mlp_dim, config.projection_dim) == (WIDTH, LAYERS, HEADS, PATCH, SIZE,
                                                     2 * WIDTH, PROJ)
  tower = _tower(config)
  out = jax.device_get(tower(params, images))
  np.testing.assert_allclose(out['tokens'], ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(out['pooled'], ref.pooler_output.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(out['embeds'], embeds, atol=1e-5, rtol=0)
  # BEiT v2's target: every patch token after ln_post, projected.
  post = with_proj.vision_model.post_layernorm
  proj = with_proj.visual_projection
  with torch.no_grad():
    target = proj(post(ref.last_hidden_state[:, 1:])).numpy()
  np.testing.assert_allclose(out['patch_features'], target, atol=1e-5, rtol=0)

  # CLIPVisionModel's own keys, as a pytorch .bin: no projection; features are D wide.
  torch.save(plain.state_dict(), tmp_path / 'plain.bin')
  params, config = clip_convert.load_clip_torch(str(tmp_path / 'plain.bin'), heads=HEADS)
  assert config.projection_dim == 0 and clip.feature_size(config) == WIDTH
  out = _apply(params, config, images)
  np.testing.assert_allclose(out['tokens'], ref_plain.last_hidden_state.numpy(), atol=1e-5,
                             rtol=0)
  np.testing.assert_allclose(out['pooled'], ref_plain.pooler_output.numpy(), atol=1e-5, rtol=0)
  assert 'embeds' not in out

  # A transformers directory: its config.json gives the heads (width // 64 would say 1).
  with_proj.save_pretrained(tmp_path / 'hf')
  params, config = clip_convert.load_clip_torch(str(tmp_path / 'hf'))
  assert config.heads == HEADS
  out = jax.device_get(tower(params, images))
  np.testing.assert_allclose(out['embeds'], embeds, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- OpenAI layout


class QuickGELU(torch.nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResBlock(torch.nn.Module):

  def __init__(self, width, heads):
    super().__init__()
    self.attn = torch.nn.MultiheadAttention(width, heads)
    self.ln_1 = torch.nn.LayerNorm(width)
    self.mlp = torch.nn.Sequential(collections.OrderedDict([
        ('c_fc', torch.nn.Linear(width, 2 * width)), ('gelu', QuickGELU()),
        ('c_proj', torch.nn.Linear(2 * width, width))]))
    self.ln_2 = torch.nn.LayerNorm(width)

  def forward(self, x):
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class Blocks(torch.nn.Module):

  def __init__(self, width, layers, heads):
    super().__init__()
    self.resblocks = torch.nn.Sequential(*[ResBlock(width, heads) for _ in range(layers)])

  def forward(self, x):
    return self.resblocks(x)


class Visual(torch.nn.Module):
  """OpenAI's parameter names; forward = BEiT v2's teacher target on NCHW images."""

  def __init__(self):
    super().__init__()
    grid = SIZE // PATCH
    self.conv1 = torch.nn.Conv2d(3, WIDTH, PATCH, stride=PATCH, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(WIDTH) * 0.3)
    self.positional_embedding = torch.nn.Parameter(torch.randn(grid * grid + 1, WIDTH) * 0.3)
    self.ln_pre = torch.nn.LayerNorm(WIDTH)
    self.transformer = Blocks(WIDTH, LAYERS, HEADS)
    self.ln_post = torch.nn.LayerNorm(WIDTH)
    self.proj = torch.nn.Parameter(torch.randn(WIDTH, PROJ) * 0.1)

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x)[:, 1:] @ self.proj


class OpenAIClip(torch.nn.Module):
  """The vision tower plus a stand-in for the text side, whose keys the converter skips."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(1)
    self.visual = Visual()
    self.token_embedding = torch.nn.Embedding(10, WIDTH)
    self.logit_scale = torch.nn.Parameter(torch.ones([]))
    self.register_buffer('input_resolution', torch.tensor(SIZE))
    with torch.no_grad():
      for name, p in self.named_parameters():
        if name.endswith('bias') or '.ln_' in name:
          p.add_(0.1 * torch.randn_like(p))

  def forward(self, x):
    return self.visual(x)


def _openai_archive(path, half=False):
  model = OpenAIClip().eval()
  if half:
    model = model.half()
  torch.jit.save(torch.jit.script(model), str(path))
  return model


def test_openai_torchscript_archive_matches_a_torch_forward(tmp_path):
  model = _openai_archive(tmp_path / 'ViT-tiny.pt')
  sd = load_torchscript_state_dict(str(tmp_path / 'ViT-tiny.pt'))
  want = model.state_dict()
  assert set(sd) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(sd[key], value.numpy(), err_msg=key)

  params, config = clip_convert.load_clip_torch(str(tmp_path / 'ViT-tiny.pt'), heads=HEADS)
  images = _images(1)
  with torch.no_grad():
    target = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  out = _apply(params, config, images)
  np.testing.assert_allclose(out['patch_features'], target, atol=1e-5, rtol=0)

  # OpenAI ships float16 weights: they convert to exactly their float32 values.
  half = _openai_archive(tmp_path / 'half.pt', half=True)
  params16, _ = clip_convert.load_clip_torch(str(tmp_path / 'half.pt'), heads=HEADS)
  np.testing.assert_array_equal(params16['positional_embedding'],
                                half.visual.positional_embedding.detach().float().numpy())
  np.testing.assert_array_equal(
      params16['transformer']['resblocks_1']['attn']['qkv']['kernel'].reshape(WIDTH, -1).T,
      half.visual.transformer.resblocks[1].attn.in_proj_weight.detach().float().numpy())


def test_the_archive_reader_runs_no_code_and_names_bad_input(tmp_path):
  evil = tmp_path / 'evil.pt'
  with zipfile.ZipFile(evil, 'w') as z:
    z.writestr('evil/data.pkl', b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.')
    z.writestr('evil/code/__torch__.py', '')
  with pytest.raises(TorchScriptError, match='os.system'):
    load_torchscript_state_dict(str(evil))
  with pytest.raises(ConversionError, match='Not a CLIP vision state dict'):
    clip_convert.clip_torch_to_flax({'encoder.weight': np.zeros((2, 2))})
  state = {k: v.numpy() for k, v in OpenAIClip().state_dict().items()}
  del state['visual.ln_post.bias']
  with pytest.raises(ConversionError, match='visual.ln_post.bias'):
    clip_convert.clip_torch_to_flax(state, heads=HEADS)


# ----------------------------------------------------------------------------- as a teacher


def _tokenizer_cfg():
  return get_vqkd_config('base', img_size=SIZE, input_size=SIZE, patch_size=PATCH, embed_dim=32,
                         depth=1, num_heads=2, mlp_dim=64, n_embed=64, code_dim=8,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                         decoder_mlp_dim=64, decoder_out_dim=PROJ)


def _teacher_fields(**fields):
  config = tokenizer_config().teacher
  config.update(fields)
  return config


def _blocks(seed, b=8):
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, size=(6, 3))
  blocks = palette[rng.integers(0, 6, size=(b, 4, 4))]
  return np.repeat(np.repeat(blocks, 8, axis=1), 8, axis=2).astype(np.uint8)


@pytest.mark.usefixtures('fast_compile')
def test_tokenizer_training_with_a_converted_clip_teacher(eight_devices, tmp_path):
  model = _openai_archive(tmp_path / 'ViT-tiny.pt')
  clip_convert.main([str(tmp_path / 'ViT-tiny.pt'), str(tmp_path / 'teacher'), '--num-heads',
                     str(HEADS)])
  stored = json.loads((tmp_path / 'teacher' / 'config.json').read_text())
  assert (stored['kind'], stored['heads'], stored['projection_dim']) == ('clip', HEADS, PROJ)
  with pytest.raises(SystemExit, match='not empty'):
    clip_convert.main([str(tmp_path / 'ViT-tiny.pt'), str(tmp_path / 'teacher')])

  cfg = _tokenizer_cfg()
  teacher = Teacher(_teacher_fields(kind='clip', path=str(tmp_path / 'teacher')), cfg)
  assert teacher.size == PROJ
  frozen = {'teacher': jax.device_get(teacher.load(str(tmp_path / 'teacher')))}
  # The features are the tower's patch features of CLIP-normalised images.
  images = _blocks(0)
  x = jnp.asarray(images, jnp.float32) / 255.0 * 2.0 - 1.0
  feats = np.asarray(jax.jit(teacher.features)(frozen, x))
  clip_input = (images / 255.0 - np.array(clip.CLIP_MEAN)) / np.array(clip.CLIP_STD)
  with torch.no_grad():
    direct = model(torch.from_numpy(clip_input.transpose(0, 3, 1, 2).astype(np.float32)))
  np.testing.assert_allclose(feats, direct.numpy(), atol=1e-4, rtol=0)

  objective = VQKDTraining(cfg, teacher, seed=0)
  tx, schedule = make_optimizer(fx.optimizer_config(lr=2e-3, warmup_steps=2), 20, cfg.depth,
                                frozen=(r'^quantize/',))
  mesh = sharding.make_mesh((1, 1, 1), devices=eight_devices[:1])
  frozen_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  state, shardings = step_lib.create_state(objective, tx, mesh, jax.random.key(0), frozen,
                                           frozen_shardings)
  put = lambda b: jax.device_put(b, sharding.batch_sharding(mesh))  # noqa: E731
  first = put({'image': {'image': _blocks(0)}})
  with sharding.use_mesh(mesh):
    params, extra = jax.jit(objective.first_batch_init)(state.params, state.extra, frozen, first)
    state = state.replace(params=params, extra=extra)
    step = step_lib.jit_train_step(step_lib.make_train_step(objective, tx, schedule), mesh,
                                   shardings, first)
    rec = []
    for i in range(8):
      state, metrics = step(state, put({'image': {'image': _blocks(i % 2)}}), jax.random.key(i))
      rec.append(float(metrics['tasks']['vqkd']['rec']) / float(metrics['tasks']['vqkd']['count']))
  assert np.all(np.isfinite(rec)) and rec[-1] < rec[0], rec
  np.testing.assert_array_equal(jax.device_get(state.frozen['teacher']['proj']),
                                frozen['teacher']['proj'])


def test_the_planner_builds_clip_vit_b16_without_weights(tmp_path):
  cfg = get_vqkd_config('base', decoder_out_dim=512)
  fields = _teacher_fields(kind='clip', path='', variant='vit_b16')
  with pytest.raises(ValueError, match='teacher.path'):
    Teacher(fields, cfg)
  teacher = Teacher(fields, cfg, planning=True)
  assert teacher.size == 512 and teacher.model_cfg.heads == 12
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(teacher.abstract_params()))
  assert 86.0e6 < n < 86.5e6, n   # OpenAI ViT-B/16's visual tower: 86.19M
  with pytest.raises(ValueError, match='decoder_out_dim'):
    VQKDTraining(get_vqkd_config('base', decoder_out_dim=768), teacher)
  with pytest.raises(ValueError, match='must match'):
    Teacher(fields, get_vqkd_config('base', decoder_out_dim=512, input_size=256), planning=True)
  # teacher.path must name a converted CLIP tower.
  (tmp_path / 'vqkd').mkdir()
  (tmp_path / 'vqkd' / 'config.json').write_text(json.dumps({'kind': 'vqkd'}))
  with pytest.raises(ValueError, match='not a CLIP vision tower'):
    Teacher(_teacher_fields(kind='clip', path=str(tmp_path / 'vqkd')), cfg)
  with pytest.raises(FileNotFoundError, match='clip_convert'):
    Teacher(_teacher_fields(kind='clip', path=str(tmp_path / 'nothing')), cfg)
