"""A tiny pretraining setup for trainer tests: model, tokenizer, objective and batches.

Everything is generated from seeds (no data files): uint8 images, block masks with an exact
count, BERT-masked texts, so that tests can run the real objective in a second or two.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from beit3_jax import models
from beit3_jax.data import masking
from beit3_jax.defaults import pretrain_config
from beit3_jax.tokenizers import abstract_variables, get_vqkd_config
from beit3_jax.jobs.masked_modeling import MaskedModeling, make_spec
from beit3_jax.trainer.optimizer import make_optimizer

TEXT_LEN = 10
VOCAB = 102  # divisible by the tensor axis of the (2, 2, 2) mesh
MASK_ID = VOCAB - 1


def model_config(**overrides):
  fields = dict(embed_dim=48, depth=2, num_heads=4, mlp_dim=96, img_size=32, patch_size=8,
                vocab_size=VOCAB, max_text_positions=24)
  fields.update(overrides)
  return models.get_config('base', **fields)


def tokenizer_config():
  return get_vqkd_config('base', img_size=32, input_size=32, patch_size=8, embed_dim=32, depth=1,
                         num_heads=2, mlp_dim=64, n_embed=64, code_dim=8, decoder_embed_dim=32,
                         decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=64,
                         decoder_out_dim=13)


def optimizer_config(**overrides):
  """The pretraining optimizer fields (every declared one), with these test values."""
  fields = dict(lr=1e-3, min_lr=0.0, warmup_steps=2, b1=0.9, b2=0.98, eps=1e-6,
                weight_decay=0.05, clip_norm=3.0, layer_decay=1.0)
  fields.update(overrides)
  config = pretrain_config().optimizer
  config.update(fields)
  return config


def objective(streams=('image', 'text', 'pair'), pair_image_mask_ratio=0.0, **model_overrides):
  cfg = model_config(**model_overrides)
  spec = make_spec(cfg, TEXT_LEN, 0.4, pair_image_mask_ratio, 0.15, 0.5,
                   {'image': 1.0, 'text': 1.0, 'pair': 1.0, 'pair_image': 1.0}, streams)
  return MaskedModeling(cfg, tokenizer_config(), spec)


@functools.lru_cache(maxsize=4)
def _tokenizer_params(seed):
  """Random tokenizer weights drawn in NumPy (no init compile): N(0, 0.02), unit codes."""
  abstract, _ = abstract_variables(tokenizer_config())
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype),
                        abstract)
  codes = rng.standard_normal(params['quantize']['embedding']['embedding'].shape)
  params['quantize']['embedding']['embedding'] = (
      codes / np.linalg.norm(codes, axis=-1, keepdims=True)).astype(np.float32)
  return params


def tokenizer_params(seed=0):
  return jax.tree.map(np.copy, _tokenizer_params(seed))


def optimizer(total_steps=20, depth=2, **overrides):
  return make_optimizer(optimizer_config(**overrides), total_steps, depth)


def _texts(rng, b, ratio):
  lengths = rng.integers(4, TEXT_LEN + 1, size=b)
  ids = np.full((b, TEXT_LEN), 1, np.int32)
  pad = np.ones((b, TEXT_LEN), bool)
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, n - 1] = 0, 2
    ids[i, 1:n - 1] = rng.integers(4, 40, size=n - 2)   # a skewed vocabulary: a baseline > 0
    pad[i, :n] = False
  inputs, targets, mask = masking.mask_text(rng, ids, pad, ratio, MASK_ID, {0, 1, 2, 3}, 4,
                                            MASK_ID)
  return {'text_ids': inputs.astype(np.int32), 'text_padding_mask': pad,
          'text_targets': targets.astype(np.int32), 'text_mask': mask}


def _images(rng, b, mask_ratio):
  cfg = model_config()
  grid = (cfg.img_size // cfg.patch_size,) * 2
  images = rng.integers(0, 256, size=(b, cfg.img_size, cfg.img_size, 3), dtype=np.uint8)
  mask_cfg = masking.BlockMaskConfig(ratio=mask_ratio, min_block=2)
  masks = np.stack([mask_cfg.sample(rng, grid) if mask_ratio else
                    np.zeros(grid[0] * grid[1], bool) for _ in range(b)])
  return {'image': images, 'tokenizer_image': images.copy(), 'image_mask': masks}


def batch(seed: int, b: int = 8, streams=('image', 'text', 'pair'), pair_image_mask_ratio=0.0):
  """One global batch of every stream, a deterministic function of `seed`."""
  rng = np.random.default_rng(seed)
  out = {}
  if 'image' in streams:
    out['image'] = _images(rng, b, 0.4)
  if 'text' in streams:
    out['text'] = _texts(rng, b, 0.15)
  if 'pair' in streams:
    out['pair'] = {**_images(rng, b, pair_image_mask_ratio), **_texts(rng, b, 0.5)}
  return out


def train_objective(objective, batch, steps=6, lr=3e-3):
  """`steps` train steps of `objective` on one fixed batch on one device, then one eval step:
  (losses (steps,), training summary of all steps, eval summary)."""
  import jax
  from beit3_jax import sharding
  from beit3_jax.trainer import step as step_lib
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx, schedule = optimizer(total_steps=steps, lr=lr, warmup_steps=1)
  state, shardings = step_lib.create_state(objective, tx, mesh, jax.random.key(0), {}, {})
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  losses, tasks = [], []
  with sharding.use_mesh(mesh):
    jitted = step_lib.jit_train_step(step_lib.make_train_step(objective, tx, schedule), mesh,
                                     shardings, batch)
    for i in range(steps):
      state, metrics = jitted(state, batch, jax.random.fold_in(jax.random.key(1), i))
      metrics = jax.device_get(metrics)
      losses.append(float(metrics['loss']))
      tasks.append(metrics['tasks'])
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(objective), mesh, shardings)
    eval_sums = jax.device_get(eval_step(state.params, state.extra, state.frozen, batch))
  summary = objective.summarize(jax.tree.map(lambda *x: np.sum(x, axis=0), *tasks))
  return np.array(losses), summary, objective.summarize(eval_sums)
