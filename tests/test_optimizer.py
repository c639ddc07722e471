"""AdamW with the paper's defaults: schedule, the no-decay set, layer decay, frozen params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_fixtures as fx
from beit3_jax.models.pretraining import BEiT3Pretraining, pretraining_example_inputs
from beit3_jax.trainer import optimizer as opt
from beit3_jax.defaults import pretrain_config


@pytest.fixture(scope='module')
def names():
  cfg = fx.model_config()
  abstract = jax.eval_shape(lambda r: BEiT3Pretraining(cfg, 64).init(
      r, **pretraining_example_inputs(cfg))['params'], jax.random.key(0))
  return opt.describe_groups(abstract, depth=cfg.depth, layer_decay=0.5)


def test_paper_defaults():
  o = pretrain_config().optimizer
  assert (o.b1, o.b2, o.eps, o.lr, o.weight_decay, o.clip_norm, o.warmup_steps) == (
      0.9, 0.98, 1e-6, 1e-3, 0.05, 3.0, 10_000)


def test_no_decay_set_follows_unilm(names):
  no_decay = set(names['no_decay'])
  assert 'beit3/encoder/embed_positions/A/embedding' in no_decay
  assert 'beit3/vision_embed/cls_token' in no_decay
  assert 'beit3/encoder/layers_0/self_attn/q_proj/A/bias' in no_decay   # (heads, d) bias
  assert 'beit3/encoder/layers_1/ffn/B/ffn_layernorm/scale' in no_decay
  decay = set(names['decay'])
  for name in ('beit3/encoder/embed_positions/B/embedding', 'beit3/vision_embed/mask_token',
               'beit3/text_embed/embedding', 'beit3/encoder/layers_0/ffn/A/fc1/kernel',
               'mim_head/kernel', 'mlm_head/kernel'):
    assert name in decay, name
  assert 'mlm_head/bias' in no_decay


def test_layer_decay_ids(names):
  scale = names['lr_scale']   # depth 2: ids 0 (embeddings) .. 3 (after the last layer)
  assert scale['beit3/text_embed/embedding'] == pytest.approx(0.5 ** 3)
  assert scale['beit3/encoder/embed_positions/A/embedding'] == pytest.approx(0.5 ** 3)
  assert scale['beit3/encoder/layers_0/ffn/A/fc1/kernel'] == pytest.approx(0.5 ** 2)
  assert scale['beit3/encoder/layers_1/ffn/A/fc1/kernel'] == pytest.approx(0.5)
  assert scale['beit3/encoder/layer_norm/A/scale'] == 1.0
  assert scale['mlm_head/kernel'] == 1.0


def _config(**kw):
  return fx.optimizer_config(**{'warmup_steps': 10, **kw})


def test_schedule_warmup_then_cosine():
  schedule = opt.learning_rate_schedule(_config(min_lr=1e-5), total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(1e-5)
  with pytest.raises(ValueError, match='warmup_steps'):
    opt.learning_rate_schedule(_config(warmup_steps=200), total_steps=100)


def test_update_matches_hand_written_adamw_with_mask_and_layer_decay():
  params = {'encoder': {'layers_0': {'fc1': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}},
            'text_embed': {'embedding': jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  tx, schedule = opt.make_optimizer(_config(warmup_steps=1, layer_decay=0.5, clip_norm=0.0),
                                    total_steps=10, depth=1)
  state = tx.init(params)
  state = tx.update(grads, state, params)[1]     # step 0 has lr 0; take step 1
  updates, _ = tx.update(grads, state, params)
  lr = float(schedule(1))
  adam = 1.0 / (1.0 + 1e-6 / 0.1)                 # m / (sqrt(v) + eps) for a constant gradient
  def want(decayed, layer):
    return -lr * 0.5 ** (2 - layer) * (adam + (0.05 if decayed else 0.0))
  np.testing.assert_allclose(updates['encoder']['layers_0']['fc1']['kernel'], want(True, 1),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['encoder']['layers_0']['fc1']['bias'], want(False, 1),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['text_embed']['embedding'], want(True, 0), rtol=1e-5)


def test_frozen_params_get_no_update_at_all():
  params = {'quantize': {'embedding': {'embedding': jnp.ones((4, 2))}},
            'encoder': {'w': {'kernel': jnp.ones((2, 2))}}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = opt.make_optimizer(_config(warmup_steps=0), total_steps=10, depth=1,
                             frozen=(r'^quantize/',))
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  assert not np.any(updates['quantize']['embedding']['embedding'])
  assert np.all(np.asarray(updates['encoder']['w']['kernel']) < 0)
  assert float(optax.tree.norm(updates)) > 0


def test_head_sublayers_are_not_backbone_layers():
  assert opt.layer_id('head/layers_0/kernel', depth=12) == 13          # VQA head.0
  assert opt.layer_id('beit3/encoder/layers_3/ffn/A/fc1/kernel', depth=12) == 4


def test_task_head_lr_weight_scales_only_the_head():
  from beit3_jax.trainer.optimizer import lr_factor
  assert lr_factor('head/layers_0/kernel', 12, 0.9, 20.0) == pytest.approx(20.0)
  assert lr_factor('head/dense1/bias', 12, 1.0, 20.0) == 20.0
  assert lr_factor('pooler/dense/kernel', 12, 0.9, 20.0) == 1.0        # unilm: only head.*
  assert lr_factor('beit3/encoder/layers_3/ffn/A/fc1/kernel', 12, 0.9, 20.0) == \
      pytest.approx(0.9 ** 9)                                          # layer id 4
