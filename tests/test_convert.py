"""Tests of beit3_jax.convert and beit3_jax.params_io: key handling, errors, files and the CLI.

Numerical parity of converted weights is tested in test_parity.py; here every state dict comes
from a tiny torchscale BEiT3 (or, for the base model, only shapes are compared).
"""

import pickle
import re

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import torchscale_ref as ref
from beit3_jax import convert, models, params_io, torch_files
from conftest import tiny_config


class NotATensor:
  """A custom object a .pth may pickle (unilm checkpoints hold `args`); never to be unpickled."""

  def __init__(self):
    self.lr = 1e-3


def flat(params) -> dict:
  return traverse_util.flatten_dict(jax.device_get(params), sep='/')


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x, y), k


def assert_state_dicts_equal(a, b):
  assert set(a) == set(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x, y), k


def tiny_overrides() -> dict:
  """The fields in which tiny_config() differs from the base variant (for the CLI --set)."""
  base, tiny = models.get_config('base').to_dict(), tiny_config().to_dict()
  return {k: v for k, v in tiny.items() if base[k] != v}


@pytest.fixture(scope='module')
def cfg():
  return tiny_config()


@pytest.fixture(scope='module')
def sd(cfg):
  """torchscale state dict (numpy) of the tiny config."""
  return ref.state_dict_numpy(ref.build_reference(cfg, seed=0))


@pytest.fixture(scope='module')
def params(cfg, sd):
  return convert.torch_to_flax(sd, cfg)


def conversion_error(state_dict, config, **kw) -> str:
  with pytest.raises(convert.ConversionError) as info:
    convert.torch_to_flax(state_dict, config, **kw)
  return str(info.value)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize('wrap', ['unilm_model', 'module', 'model', 'state_dict'])
def test_prefix_and_wrappers_read_like_plain(cfg, sd, params, wrap):
  if wrap == 'unilm_model':
    wrapped = {'model': {'beit3.' + k: v for k, v in sd.items()}}
  else:
    wrapped = {wrap: dict(sd)}
  report = convert.Report()
  assert_trees_equal(convert.torch_to_flax(wrapped, cfg, report=report), params)
  assert report.converted == len(sd) and report.skipped == []


def test_report_counts_plain(cfg, sd):
  report = convert.Report()
  convert.torch_to_flax(sd, cfg, report=report)
  assert report.converted == len(sd) == len(flat(convert.torch_to_flax(sd, cfg)))


def test_torch_tensors_are_accepted(cfg, sd, params):
  tensors = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
  assert_trees_equal(convert.torch_to_flax(tensors, cfg), params)


# ----------------------------------------------------------------------------- errors

MISSING = 'encoder.layers.1.self_attn.k_proj.B.bias'
EXTRA = 'encoder.layers.0.extra_proj.weight'
MISSHAPED = 'encoder.layers.0.ffn.A.fc1.weight'  # (mlp_dim, embed_dim) = (96, 48)


def test_missing_key_is_named(cfg, sd):
  bad = {k: v for k, v in sd.items() if k != MISSING}
  msg = conversion_error(bad, cfg)
  assert 'missing' in msg and MISSING in msg
  assert 'unexpected' not in msg and 'wrong shape' not in msg


def test_unexpected_key_is_named(cfg, sd):
  msg = conversion_error({**sd, EXTRA: np.zeros(3, np.float32)}, cfg)
  assert 'unexpected' in msg and EXTRA in msg
  assert 'missing' not in msg and 'wrong shape' not in msg


def test_wrong_shape_is_named_with_both_shapes(cfg, sd):
  assert sd[MISSHAPED].shape == (96, 48)
  msg = conversion_error({**sd, MISSHAPED: np.zeros((97, 48), np.float32)}, cfg)
  assert 'wrong shape' in msg and MISSHAPED in msg
  assert str((97, 48)) in msg and str((96, 48)) in msg
  assert 'missing' not in msg and 'unexpected' not in msg


def test_all_defects_in_one_error(cfg, sd):
  bad = {k: v for k, v in sd.items() if k != MISSING}
  bad[EXTRA] = np.zeros(3, np.float32)
  bad[MISSHAPED] = np.zeros((97, 48), np.float32)
  msg = conversion_error(bad, cfg)
  for word, key in (('missing', MISSING), ('unexpected', EXTRA), ('wrong shape', MISSHAPED)):
    line = next(l for l in msg.splitlines() if l.strip().startswith(word))
    assert key in line, (word, msg)


def test_head_outside_backbone_is_unexpected_unless_skipped(cfg, sd, params):
  unilm = {'beit3.' + k: v for k, v in sd.items()}
  unilm['mim_head.weight'] = np.zeros((101, 48), np.float32)
  msg = conversion_error({'model': unilm}, cfg)
  assert 'unexpected' in msg and 'mim_head.weight' in msg
  assert 'missing' not in msg
  report = convert.Report()
  got = convert.torch_to_flax({'model': unilm}, cfg, skip=[r'^mim_head\.'], report=report)
  assert report.skipped == ['mim_head.weight']
  assert report.converted == len(sd)
  assert_trees_equal(got, params)


def test_skip_that_matches_nothing_changes_nothing(cfg, sd, params):
  report = convert.Report()
  got = convert.torch_to_flax(sd, cfg, skip=[r'^mim_head\.'], report=report)
  assert report.skipped == [] and report.converted == len(sd)
  assert_trees_equal(got, params)


def test_other_variant_error_guesses_the_checkpoint(sd):
  other = tiny_config(depth=3, embed_dim=64, num_heads=4, mlp_dim=128)
  msg = conversion_error(sd, other)
  guess = next(l for l in msg.splitlines() if 'looks like' in l)
  assert 'depth=2' in guess and 'embed_dim=48' in guess and 'mlp_dim=96' in guess
  # The model's own config is described too, and the absent third layer is missing.
  assert 'depth=3' in msg.splitlines()[0] and 'embed_dim=64' in msg.splitlines()[0]
  assert 'missing' in msg and 'encoder.layers.2.' in msg
  assert 'wrong shape' in msg


def test_other_img_size_names_the_position_table(sd):
  msg = conversion_error(sd, tiny_config(img_size=48))
  wrong = next(l for l in msg.splitlines() if l.strip().startswith('wrong shape'))
  assert 'encoder.embed_positions.A.weight' in wrong
  # (32 / 8)**2 + 3 = 19 rows in the checkpoint, (48 / 8)**2 + 3 = 39 wanted.
  assert str((19, 48)) in wrong and str((39, 48)) in wrong
  assert 'missing' not in msg and 'unexpected' not in msg
  assert 'img_size=32' in next(l for l in msg.splitlines() if 'looks like' in l)


def test_flax_to_torch_missing_leaf_is_named(cfg, params):
  tree = flat(params)
  path = 'encoder/layers_1/self_attn/q_proj/A/bias'
  del tree[path]
  with pytest.raises(convert.ConversionError, match='missing') as info:
    convert.flax_to_torch(traverse_util.unflatten_dict(tree, sep='/'), cfg)
  assert path in str(info.value)


def test_flax_to_torch_extra_leaf_is_named(cfg, params):
  tree = flat(params)
  path = 'encoder/layers_0/extra/kernel'
  tree[path] = np.zeros((48, 48), np.float32)
  with pytest.raises(convert.ConversionError, match='unexpected') as info:
    convert.flax_to_torch(traverse_util.unflatten_dict(tree, sep='/'), cfg)
  assert path in str(info.value)


def test_flax_to_torch_wrong_shape_is_named(cfg, params):
  tree = flat(params)
  path = 'encoder/layers_0/ffn/A/fc1/kernel'
  tree[path] = np.zeros((48, 97), np.float32)
  with pytest.raises(convert.ConversionError, match='wrong shape') as info:
    convert.flax_to_torch(traverse_util.unflatten_dict(tree, sep='/'), cfg)
  assert path in str(info.value) and str((48, 97)) in str(info.value)


def test_unknown_layout_is_refused(cfg, params):
  with pytest.raises(ValueError, match='layout'):
    convert.flax_to_torch(params, cfg, layout='timm')


# ----------------------------------------------------------------------------- shapes


def test_expected_shapes_of_base_equal_torchscale():
  config = models.get_config('base')
  want = convert.expected_torch_shapes(config)
  _, BEiT3 = ref.import_torchscale()
  with torch.device('meta'):  # shapes only: no memory, no init work
    torch_sd = BEiT3(ref.encoder_config(config)).state_dict()
  got = {k: tuple(v.shape) for k, v in torch_sd.items()}
  assert set(want) == set(got), (sorted(set(want) ^ set(got)))
  for k in want:
    assert want[k] == got[k], (k, want[k], got[k])
  unilm = convert.expected_torch_shapes(config, layout='unilm')
  assert all(k.startswith('beit3.') for k in unilm)
  assert unilm == {'beit3.' + k: v for k, v in want.items()}


def test_expected_shapes_of_tiny_equal_its_state_dict(cfg, sd):
  assert convert.expected_torch_shapes(cfg) == {k: v.shape for k, v in sd.items()}


# ----------------------------------------------------------------------------- files


def test_safetensors_round_trip(sd, tmp_path):
  path = str(tmp_path / 'w.safetensors')
  torch_files.save_state_dict(sd, path)
  assert_state_dicts_equal(torch_files.load_state_dict(path), sd)


@pytest.mark.parametrize('wrap_model', [False, True])
def test_pth_round_trip(sd, tmp_path, wrap_model):
  path = str(tmp_path / 'w.pth')
  torch_files.save_state_dict(sd, path, wrap_model=wrap_model)
  raw = torch.load(path, map_location='cpu', weights_only=True)
  assert (set(raw) == {'model'}) if wrap_model else (set(raw) == set(sd))
  assert_state_dicts_equal(torch_files.load_state_dict(path), sd)


@pytest.mark.parametrize('name', ['w.safetensors', 'w.pth'])
def test_save_refuses_to_overwrite(sd, tmp_path, name):
  path = str(tmp_path / name)
  torch_files.save_state_dict(sd, path)
  with pytest.raises(FileExistsError):
    torch_files.save_state_dict(sd, path)
  small = {'x': np.arange(3, dtype=np.float32)}
  torch_files.save_state_dict(small, path, overwrite=True)
  assert_state_dicts_equal(torch_files.load_state_dict(path), small)


def test_pth_with_pickled_object_is_not_unpickled(sd, tmp_path):
  path = str(tmp_path / 'with_args.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}, 'args': NotATensor()},
             path)
  with pytest.raises(pickle.UnpicklingError, match='[Ww]eights only load failed'):
    torch_files.load_state_dict(path)


def test_load_state_dict_bad_paths(tmp_path):
  with pytest.raises(FileNotFoundError):
    torch_files.load_state_dict(str(tmp_path / 'nope.pth'))
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(ValueError, match='safetensors'):
    torch_files.load_state_dict(str(tmp_path / 'w.npz'))
  with pytest.raises(ValueError, match='safetensors'):
    torch_files.save_state_dict({}, str(tmp_path / 'w.npz'), overwrite=True)


# ----------------------------------------------------------------------------- params_io


def test_params_io_round_trip(cfg, params, tmp_path):
  out = tmp_path / 'ckpt'
  params_io.save_params(out, params, cfg)
  assert_trees_equal(params_io.load_params(out, cfg), params)
  assert_trees_equal(params_io.load_params(out), params)  # its own config.json
  assert params_io.load_model_config(out).to_dict() == cfg.to_dict()
  assert params_io.load_model_config(str(out)).to_dict() == cfg.to_dict()


def test_params_io_refuses_non_empty_dir(cfg, params, tmp_path):
  out = tmp_path / 'ckpt'
  out.mkdir()
  (out / 'other.txt').write_text('keep me')
  with pytest.raises(FileExistsError):
    params_io.save_params(out, params, cfg)
  assert (out / 'other.txt').read_text() == 'keep me'
  params_io.save_params(out, params, cfg, overwrite=True)
  assert not (out / 'other.txt').exists()
  assert_trees_equal(params_io.load_params(out, cfg), params)


@pytest.mark.parametrize('other', [
    dict(depth=3),           # another tree structure
    dict(embed_dim=64),      # same tree, other shapes
    dict(img_size=48),       # one table of another shape
])
def test_params_io_load_with_other_config_raises(cfg, params, tmp_path, other):
  out = tmp_path / 'ckpt'
  params_io.save_params(out, params, cfg)
  with pytest.raises(ValueError, match='do not fit'):
    params_io.load_params(out, tiny_config(**other))


def test_load_params_of_non_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError):
    params_io.load_params(tmp_path)


def test_load_model_config_from_py_file(tmp_path):
  (tmp_path / 'run_config.py').write_text(
      'import ml_collections\n'
      'import beit3_jax.models\n'
      '\n'
      'def get_config():\n'
      '  config = ml_collections.ConfigDict()\n'
      '  config.learning_rate = 1e-3\n'
      "  config.model = beit3_jax.models.get_config('base', embed_dim=48, depth=2, num_heads=4,\n"
      '                                             mlp_dim=96, img_size=32, patch_size=8)\n'
      '  return config\n')
  got = params_io.load_model_config(str(tmp_path / 'run_config.py'))
  want = models.get_config('base', embed_dim=48, depth=2, num_heads=4, mlp_dim=96, img_size=32,
                           patch_size=8)
  assert got.to_dict() == want.to_dict()


def test_load_model_config_missing(tmp_path):
  with pytest.raises(FileNotFoundError):
    params_io.load_model_config(tmp_path)
  with pytest.raises(FileNotFoundError):
    params_io.load_model_config(str(tmp_path / 'absent.py'))


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(cfg, sd, params, tmp_path, capsys):
  src = str(tmp_path / 'in.pth')
  torch_files.save_state_dict(sd, src)
  outdir = str(tmp_path / 'flax')
  sets = [a for k, v in tiny_overrides().items() for a in ('--set', f'{k}={v}')]
  assert convert.main(['to-flax', src, outdir, '--variant', 'base', *sets]) == 0
  printed = capsys.readouterr().out
  assert 'as base' in printed
  assert f'{models.count_params(params):,} parameters' in printed
  assert f'Converted {len(sd)} tensors' in printed
  assert params_io.load_model_config(outdir).to_dict() == cfg.to_dict()
  assert_trees_equal(params_io.load_params(outdir), params)

  # Back to torch, the config taken from outdir/config.json.
  out_st = str(tmp_path / 'out.safetensors')
  assert convert.main(['to-torch', outdir, out_st]) == 0
  printed = capsys.readouterr().out
  assert 'as base' in printed and f'{models.count_params(params):,} parameters' in printed
  assert_state_dicts_equal(torch_files.load_state_dict(out_st), sd)

  # unilm layout: {'model': {'beit3.' + key: tensor}}.
  out_pth = str(tmp_path / 'out_unilm.pth')
  assert convert.main(['to-torch', outdir, out_pth, '--layout', 'unilm']) == 0
  capsys.readouterr()
  raw = torch.load(out_pth, map_location='cpu', weights_only=True)
  assert set(raw) == {'model'}
  assert_state_dicts_equal({k: v.numpy() for k, v in raw['model'].items()},
                           {'beit3.' + k: v for k, v in sd.items()})

  # The same output again: refused without --overwrite, done with it.
  with pytest.raises(FileExistsError):
    convert.main(['to-flax', src, outdir, '--variant', 'base', *sets])
  with pytest.raises(FileExistsError):
    convert.main(['to-torch', outdir, out_st])
  capsys.readouterr()
  assert convert.main(['to-flax', src, outdir, '--variant', 'base', *sets, '--overwrite']) == 0
  assert_trees_equal(params_io.load_params(outdir), params)


def test_cli_config_dir_and_skip(cfg, sd, params, tmp_path, capsys):
  """to-flax --config DIR (a dir with config.json) and --skip; to-torch --config DIR."""
  cfg_dir = tmp_path / 'cfg'
  cfg_dir.mkdir()
  (cfg_dir / 'config.json').write_text(
      __import__('json').dumps({'model': cfg.to_dict(), 'learning_rate': 1e-3}))
  src = str(tmp_path / 'in_unilm.pth')
  torch_files.save_state_dict({**{'beit3.' + k: v for k, v in sd.items()},
                           'mim_head.weight': np.zeros((101, 48), np.float32)},
                          src, wrap_model=True)
  outdir = str(tmp_path / 'flax')
  with pytest.raises(convert.ConversionError, match=re.escape('mim_head.weight')):
    convert.main(['to-flax', src, outdir, '--config', str(cfg_dir)])
  capsys.readouterr()
  assert convert.main(['to-flax', src, outdir, '--config', str(cfg_dir),
                       '--skip', r'^mim_head\.']) == 0
  printed = capsys.readouterr().out
  assert 'Skipped on request (1): mim_head.weight' in printed
  assert_trees_equal(params_io.load_params(outdir), params)

  out = str(tmp_path / 'out.safetensors')
  assert convert.main(['to-torch', outdir, out, '--config', outdir]) == 0
  assert_state_dicts_equal(torch_files.load_state_dict(out), sd)


def test_cli_needs_a_model(sd, tmp_path):
  src = str(tmp_path / 'in.safetensors')
  torch_files.save_state_dict(sd, src)
  with pytest.raises(SystemExit, match='--variant'):
    convert.main(['to-flax', src, str(tmp_path / 'out')])
  with pytest.raises(SystemExit, match='not both'):
    convert.main(['to-flax', src, str(tmp_path / 'out'), '--variant', 'base',
                  '--config', str(tmp_path)])
  with pytest.raises(SystemExit, match='FIELD=VALUE'):
    convert.main(['to-flax', src, str(tmp_path / 'out'), '--variant', 'base', '--set', 'depth'])
