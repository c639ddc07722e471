"""Fine-tuning heads against a PyTorch statement of unilm's heads on torchscale's BEiT3.

Each Flax model (backbone + head, unilm key names) is given random weights with no constant
left, exported with `convert.model_to_torch` (unilm layout), loaded into torchscale's BEiT3
(strict) and into the head written below in PyTorch as unilm's `modeling_finetune.py` defines
it; outputs and losses agree to 1e-5 in float32, and import after export is bitwise.
"""

import math

import flax.linen as nn_flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchscale_ref as ref
from beit3_jax import convert
from beit3_jax.models import get_config, heads
from beit3_jax import losses

pytestmark = pytest.mark.usefixtures('fast_compile')

TOL = 1e-5
B, L = 3, 7


def config(**kw):
  fields = dict(embed_dim=48, depth=2, num_heads=4, mlp_dim=96, img_size=32, patch_size=8,
                vocab_size=101, max_text_positions=24)
  fields.update(kw)
  return get_config('base', **fields)


def inputs(seed=0, b=B):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(4, 100, (b, L)).astype(np.int32)
  ids[:, 0] = 0
  pad = np.zeros((b, L), bool)
  pad[-1, L - 2:] = True
  return images, ids, pad


def init(model, *args, seed=0, **kwargs):
  """Params with every leaf perturbed (no constant LayerNorm, zero bias or 0.001 head left)."""
  params = jax.jit(lambda r: model.init(r, *args, **kwargs))(jax.random.key(seed))['params']
  params = jax.tree.map(np.asarray, jax.device_get(nn_flax.meta.unbox(params)))
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                      params)


def torch_parts(params, cfg):
  """(torchscale BEiT3 with the exported backbone, the exported head tensors)."""
  sd = convert.model_to_torch(params, cfg, layout='unilm')
  backbone = {k[len('beit3.'):]: torch.from_numpy(v) for k, v in sd.items()
              if k.startswith('beit3.')}
  _, BEiT3 = ref.import_torchscale()
  model = BEiT3(ref.encoder_config(cfg)).eval()
  model.load_state_dict(backbone, strict=True)
  head = {k: torch.from_numpy(v) for k, v in sd.items() if not k.startswith('beit3.')}
  return model, head, sd


def load(module, head, prefix=''):
  state = {k[len(prefix):]: v for k, v in head.items() if k.startswith(prefix)}
  module.load_state_dict(state, strict=True)
  return module.eval()


def check_round_trip(sd, cfg, params):
  back = convert.model_to_flax({'model': sd}, cfg, params)
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(back),
                              jax.tree_util.tree_leaves_with_path(params)):
    assert pa == pb and np.array_equal(np.asarray(a), b), pa


def close(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b.detach().numpy() if torch.is_tensor(b) else b,
                                               np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  assert np.max(np.abs(a - b)) <= TOL, np.max(np.abs(a - b))


def test_image_classification():
  cfg = config(normalize_output=False)
  images, _, _ = inputs()
  model = heads.ImageClassifier(cfg, num_classes=5)
  params = init(model, jnp.asarray(images))
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images)
  labels = np.array([0, 3, 4])
  loss = losses.cross_entropy(logits, labels, label_smoothing=0.1)

  beit3, head, sd = torch_parts(params, cfg)
  fc_norm = load(nn.LayerNorm(cfg.embed_dim), head, 'fc_norm.')
  linear = load(nn.Linear(cfg.embed_dim, 5), head, 'head.')
  x, _ = ref.run_reference(beit3, images=images)
  with torch.no_grad():
    t_logits = linear(fc_norm(torch.from_numpy(x)[:, 1:].mean(1)))
    logp = F.log_softmax(t_logits, -1)
    nll = -logp.gather(-1, torch.from_numpy(labels)[:, None])[:, 0]
    t_loss = (0.9 * nll + 0.1 * (-logp.mean(-1))).mean()   # timm LabelSmoothingCrossEntropy
  close(logits, t_logits)
  close(loss, t_loss)
  check_round_trip(sd, cfg, params)


class TwoLayerMLP(nn.Module):
  def __init__(self, d_in, hidden, d_out):
    super().__init__()
    self.norm1, self.dense1 = nn.LayerNorm(d_in), nn.Linear(d_in, hidden)
    self.norm2, self.act, self.dense2 = nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_out)

  def forward(self, x):
    return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


def test_nlvr2():
  cfg = config()
  images, ids, pad = inputs()
  images_b = inputs(seed=5)[0]
  model = heads.NLVR2Classifier(cfg)
  params = init(model, jnp.asarray(images), jnp.asarray(images_b), jnp.asarray(ids),
                jnp.asarray(pad))
  logits = jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, images, images_b, ids,
                                                                  pad)
  labels = np.array([1, 0, 1])
  loss = losses.cross_entropy(logits, labels)

  beit3, head, sd = torch_parts(params, cfg)
  mlp = load(TwoLayerMLP(4 * cfg.embed_dim, 2 * cfg.embed_dim, 2), head, 'head.')
  x, _ = ref.run_reference(beit3, images=np.concatenate([images, images_b]),
                           text_ids=np.concatenate([ids, ids]),
                           text_padding_mask=np.concatenate([pad, pad]))
  x = torch.from_numpy(x)
  split = 1 + (cfg.img_size // cfg.patch_size) ** 2
  with torch.no_grad():
    cls = torch.cat([x[:, 0, :], x[:, split, :]], dim=-1)
    t_logits = mlp(torch.cat([cls[:B], cls[B:]], dim=-1))
    t_loss = F.cross_entropy(t_logits, torch.from_numpy(labels))
  close(logits, t_logits)
  close(loss, t_loss)
  check_round_trip(sd, cfg, params)


class Pooler(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.norm, self.dense, self.activation = nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh()

  def forward(self, x):
    return self.activation(self.dense(self.norm(x[:, 0, :])))


def test_vqa():
  cfg = config(normalize_output=False)
  images, ids, pad = inputs()
  answers = 11
  model = heads.VQAModel(cfg, num_answers=answers)
  params = init(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(pad))
  logits = jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, images, ids, pad)
  targets = np.random.default_rng(3).choice([0, 0.3, 0.6, 0.9, 1.0], (B, answers)).astype(
      np.float32)
  loss = losses.vqa_loss(logits, targets)

  beit3, head, sd = torch_parts(params, cfg)
  pooler = load(Pooler(cfg.embed_dim), head, 'pooler.')
  d = cfg.embed_dim
  mlp = load(nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                           nn.Linear(2 * d, answers)), head, 'head.')
  x, _ = ref.run_reference(beit3, images=images, text_ids=ids, text_padding_mask=pad)
  with torch.no_grad():
    t_logits = mlp(pooler(torch.from_numpy(x)))
    t_loss = F.binary_cross_entropy_with_logits(t_logits, torch.from_numpy(targets)) * answers
  close(logits, t_logits)
  close(loss, t_loss)
  check_round_trip(sd, cfg, params)


def test_retrieval():
  cfg = config()
  images, ids, pad = inputs()
  model = heads.RetrievalModel(cfg)
  params = init(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(pad))
  out = jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, images, ids, pad)
  loss = losses.contrastive_loss(out['image_features'], out['text_features'], out['logit_scale'])

  beit3, head, sd = torch_parts(params, cfg)
  assert set(head) == {'vision_head.weight', 'language_head.weight', 'logit_scale'}
  vision = load(nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False), head, 'vision_head.')
  language = load(nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=False), head, 'language_head.')
  xi, _ = ref.run_reference(beit3, images=images)
  xt, _ = ref.run_reference(beit3, text_ids=ids, text_padding_mask=pad)
  with torch.no_grad():
    fi = F.normalize(vision(torch.from_numpy(xi)[:, 0, :]), dim=-1)
    ft = F.normalize(language(torch.from_numpy(xt)[:, 0, :]), dim=-1)
    scale = head['logit_scale'].exp()
    logits_i = scale * fi @ ft.t()
    labels = torch.arange(B)
    t_loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_i.t(), labels)) / 2
  close(out['image_features'], fi)
  close(out['text_features'], ft)
  close(loss, t_loss)
  assert float(head['logit_scale']) != pytest.approx(math.log(1 / 0.07))  # perturbed
  check_round_trip(sd, cfg, params)


def captioning_mask(n_image, n_text):
  """1 = blocked: image sees image; text sees image and earlier text (incl. itself)."""
  s = n_image + n_text
  mask = np.ones((s, s), np.int64)
  mask[:n_image, :n_image] = 0
  mask[n_image:, :n_image] = 0
  mask[n_image:, n_image:] = np.triu(np.ones((n_text, n_text), np.int64), 1)
  return mask


def test_captioning():
  cfg = config()
  images, ids, pad = inputs()
  n_image = 1 + (cfg.img_size // cfg.patch_size) ** 2
  attn = captioning_mask(n_image, L)
  index = np.array([[1, 3, 5], [2, 4, 6], [1, 2, 3]], np.int32)
  model = heads.CaptioningModel(cfg)
  params = init(model, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(index),
                jnp.asarray(pad), jnp.asarray(attn))
  logits = jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, images, ids, index, pad,
                                                                  attn)
  targets = np.random.default_rng(4).integers(4, 100, index.shape)
  valid = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
  loss = losses.cross_entropy(logits, targets, label_smoothing=0.1, weights=valid)

  beit3, head, sd = torch_parts(params, cfg)
  mlm = load(nn.Linear(cfg.embed_dim, cfg.vocab_size), head, 'mlm_head.')
  x, _ = ref.run_reference(beit3, images=images, text_ids=ids, text_padding_mask=pad,
                           attn_mask=attn)
  with torch.no_grad():
    text = torch.from_numpy(x)[:, n_image:]
    picked = text.gather(1, torch.from_numpy(index).long()[..., None].expand(-1, -1,
                                                                              cfg.embed_dim))
    t_logits = mlm(picked)
    logp = F.log_softmax(t_logits, -1)
    nll = -logp.gather(-1, torch.from_numpy(targets)[..., None])[..., 0]
    per = 0.9 * nll + 0.1 * (-logp.mean(-1))
    w = torch.from_numpy(valid)
    t_loss = (per * w).sum() / w.sum()
  close(logits, t_logits)
  close(loss, t_loss)
  check_round_trip(sd, cfg, params)
