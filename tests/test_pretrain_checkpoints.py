"""The pretraining trainer and PyTorch checkpoints, both ways.

1. `init_from` a converted torchscale checkpoint: at step 0 the trainer's backbone params are
   the converted ones bit for bit, the heads are freshly initialised, and the backbone's
   outputs equal torchscale's (the parity tolerance, 1e-5).
2. `to-torch --layout unilm` of a pretraining workdir: `beit3.*` plus the MIM and MLM heads in
   torch layout; the backbone loads strictly into torchscale's BEiT3 and computes what ours
   computes; `--layout torchscale` refuses (the heads have no place there).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import traverse_util

import torchscale_ref as ref
import train_fixtures as fx
from beit3_jax import convert, models, params_io, sharding
from beit3_jax.trainer import loop
from beit3_jax.defaults import loop_fields
from beit3_jax.trainer.run_config import save_run_config

pytestmark = pytest.mark.usefixtures('fast_compile')

TOL = 1e-5  # the project's parity tolerance (tests/test_parity.py)
HEADS = ('mim_head', 'mlm_head')
# Images (MIM) and texts train both heads; the pair stream would add a third backbone pass to
# the train step, and compile time (most of this file's time) with it.
STREAMS = ('image', 'text')


class HostBatches:
  """A resumable stand-in for the data mixture: batch i is fx.batch(i, b, STREAMS)."""

  def __init__(self, b=8):
    self.b, self.next_index = b, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = fx.batch(self.next_index, self.b, streams=STREAMS)
    self.next_index += 1
    return batch

  def snapshot(self):   # the `pipeline.Mixture` protocol the trainer uses
    return {'all': {'position': self.next_index, 'restored': {}, 'local': {}}}

  def set_state(self, state):
    self.next_index = int(state['streams']['all']['position'])

  def close(self):
    pass


def run_config(**overrides):
  """A pretraining run config as the loop and the convert CLI read it (loop fields + model)."""
  config = ml_collections.ConfigDict({'job': 'pretrain'})
  loop_fields(config)
  config.update(total_steps=0, checkpoint_every=1, log_every=1, eval_every=0, eval_batches=1,
                mesh_shape=(2, 2, 2))
  config.model = fx.model_config()
  config.update(overrides)
  return config


def make_job(config):
  mesh = sharding.make_mesh(config.mesh_shape)
  tok = fx.tokenizer_params()
  tok_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tok)
  tx, schedule = fx.optimizer()  # a 20-step schedule: the run length does not matter here
  return loop.Job(objective=fx.objective(streams=STREAMS), tx=tx, schedule=schedule,
                  train_data=HostBatches(), eval_data=None,
                  frozen={'tokenizer': jax.device_put(tok, tok_shardings)},
                  frozen_shardings={'tokenizer': tok_shardings}, flops_per_step=1.0,
                  examples_per_step=16, tokens_per_step=1)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def flat(tree):
  return traverse_util.flatten_dict(host(tree), sep='/')


def assert_trees_bitwise(a, b):
  fa, fb = flat(a), flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    assert np.array_equal(fa[k], fb[k]), k


def padded_inputs(cfg, batch=2, text_len=7, seed=0):
  """Image + text, the last row ending in 3 pads."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, cfg.img_size, cfg.img_size, cfg.in_chans))
  ids = rng.integers(0, cfg.vocab_size, (batch, text_len)).astype(np.int32)
  pad = np.zeros((batch, text_len), bool)
  pad[-1, text_len - 3:] = True
  return dict(images=images.astype(np.float32), text_ids=ids, text_padding_mask=pad)


_FORWARDS = {}


def forward(cfg, params, inputs):
  """Our encoder_out on one device from host params (one jitted function per config)."""
  key = cfg.to_json(sort_keys=True)
  if key not in _FORWARDS:
    model = models.BEiT3(cfg)
    _FORWARDS[key] = jax.jit(lambda p, kw: model.apply({'params': p}, **kw)['encoder_out'])
  fn = _FORWARDS[key]
  return np.asarray(fn(host(params), {k: jnp.asarray(v) for k, v in inputs.items()}))


def test_init_from_converted_torch_checkpoint_matches_torchscale(tmp_path, eight_devices,
                                                                 capsys):
  cfg = fx.model_config()
  torch_model = ref.build_reference(cfg, seed=7)
  pth = str(tmp_path / 'torchscale.pth')
  torch.save(torch_model.state_dict(), pth)

  # The model config comes from a run config.json (as a workdir holds), via --config.
  config_dir = tmp_path / 'config_src'
  save_run_config(run_config(), str(config_dir))
  flax_dir = str(tmp_path / 'flax')
  assert convert.main(['to-flax', pth, flax_dir, '--config', str(config_dir)]) == 0
  converted = params_io.load_params(flax_dir)

  config = run_config(total_steps=0, init_from=flax_dir)
  out = loop.train(config, str(tmp_path / 'run'), make_job(config))
  state = out['state']
  assert 'initialised from params directory' in capsys.readouterr().out
  assert int(jax.device_get(state.step)) == 0
  params = host(state.params)
  assert set(params) == {'beit3', *HEADS}

  # The backbone is the converted checkpoint, bit for bit.
  assert_trees_bitwise(params['beit3'], converted)
  # The heads (absent from the checkpoint) are freshly initialised: right shapes, finite, random.
  codebook = fx.tokenizer_config().n_embed
  assert params['mim_head']['kernel'].shape == (cfg.embed_dim, codebook)
  assert params['mim_head']['bias'].shape == (codebook,)
  assert params['mlm_head']['kernel'].shape == (cfg.embed_dim, cfg.vocab_size)
  assert params['mlm_head']['bias'].shape == (cfg.vocab_size,)
  for name in HEADS:
    for leaf in params[name].values():
      assert np.all(np.isfinite(leaf)), name
    assert np.std(params[name]['kernel']) > 0, name

  # Step-0 outputs: torchscale's within the parity tolerance, the converted params' exactly.
  inputs = padded_inputs(cfg)
  want, _ = ref.run_reference(torch_model, **inputs)
  got = forward(cfg, params['beit3'], inputs)
  assert got.shape == want.shape == (2, 1 + models.num_patches(cfg) + 7, cfg.embed_dim)
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()
  assert np.array_equal(got, forward(cfg, converted, inputs))


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, eight_devices):
  """A 2-step pretraining run (a checkpoint after each step) in a workdir with config.json."""
  workdir = tmp_path_factory.mktemp('pretrain_run')
  config = run_config(total_steps=2, checkpoint_every=1)
  save_run_config(config, str(workdir))
  out = loop.train(config, str(workdir), make_job(config))
  return workdir, host(out['state'].params), int(jax.device_get(out['state'].step))


def test_export_pretraining_checkpoint_unilm(trained_run, tmp_path, capsys):
  workdir, final_params, step = trained_run
  assert step == 2
  cfg = fx.model_config()
  ckpt_params, step_dir = params_io.load_training_params(workdir)
  assert step_dir.name == '2'
  assert_trees_bitwise(ckpt_params, final_params)

  out = str(tmp_path / 'pretrain_unilm.pth')
  assert convert.main(['to-torch', str(workdir), out, '--layout', 'unilm']) == 0
  assert 'training checkpoint' in capsys.readouterr().out
  raw = torch.load(out, map_location='cpu', weights_only=True)
  assert set(raw) == {'model'}  # unilm wraps the state dict
  sd = {k: v.numpy() for k, v in raw['model'].items()}

  codebook = fx.tokenizer_config().n_embed
  heads = {k: v for k, v in sd.items() if not k.startswith('beit3.')}
  assert {k: v.shape for k, v in heads.items()} == {
      'mim_head.weight': (codebook, cfg.embed_dim), 'mim_head.bias': (codebook,),
      'mlm_head.weight': (cfg.vocab_size, cfg.embed_dim), 'mlm_head.bias': (cfg.vocab_size,)}
  for name in HEADS:
    np.testing.assert_array_equal(heads[f'{name}.weight'], ckpt_params[name]['kernel'].T)
    np.testing.assert_array_equal(heads[f'{name}.bias'], ckpt_params[name]['bias'])

  # The backbone: exactly our params in torch layout, and it loads strictly into torchscale.
  backbone = {k[len('beit3.'):]: v for k, v in sd.items() if k.startswith('beit3.')}
  expected = convert.flax_to_torch(ckpt_params['beit3'], cfg)
  assert set(backbone) == set(expected)
  for k in expected:
    assert np.array_equal(backbone[k], expected[k]), k
  torch_model = ref.build_reference(cfg, seed=8)
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in backbone.items()},
                              strict=True)
  inputs = padded_inputs(cfg, seed=1)
  want, _ = ref.run_reference(torch_model, **inputs)
  got = forward(cfg, ckpt_params['beit3'], inputs)
  assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def test_export_pretraining_checkpoint_torchscale_layout_refuses(trained_run, tmp_path):
  workdir, _, _ = trained_run
  out = tmp_path / 'pretrain_torchscale.pth'
  with pytest.raises(ValueError, match='unilm') as info:
    convert.main(['to-torch', str(workdir), str(out), '--layout', 'torchscale'])
  assert 'mim_head' in str(info.value) and 'mlm_head' in str(info.value)
  assert not out.exists()


def test_export_reads_a_relative_workdir(trained_run, tmp_path, monkeypatch):
  workdir, final_params, _ = trained_run
  monkeypatch.chdir(workdir.parent)
  params, step_dir = params_io.load_training_params(workdir.name)   # e.g. workdirs/demo
  assert step_dir.is_absolute() and step_dir.name == '2'
  assert_trees_bitwise(params, final_params)
