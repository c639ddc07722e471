"""The ahead-of-time planner: TPU slices by name, the shape-aware sharding rules, and real
compiles for a TPU slice with libtpu's compiler (no TPU here)."""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from beit3_jax import sharding
from beit3_jax.defaults import ConfigError, load_config_file
from beit3_jax.models import get_config
from beit3_jax.planning import planner, slices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')   # libtpu's machine-wide lock


@pytest.mark.parametrize('name, generation, topology, chips', [
    ('v5p-8', 'v5p', (2, 2, 1), 4),
    ('v5p-128', 'v5p', (4, 4, 4), 64),
    ('v5p-256', 'v5p', (4, 4, 8), 128),
    ('v5p-512', 'v5p', (4, 8, 8), 256),
    ('v4-8', 'v4', (2, 2, 1), 4),
    ('v4-512', 'v4', (4, 8, 8), 256),
    ('v5litepod-64', 'v5e', (8, 8), 64),
    ('v6e-256', 'v6e', (16, 16), 256),
    ('v5p:8x8x4', 'v5p', (8, 8, 4), 256),
])
def test_slice_names(name, generation, topology, chips):
  tpu = slices.parse(name)
  assert (tpu.generation, tpu.topology, tpu.chips) == (generation, topology, chips)
  assert slices.parse(name, num_slices=2).chips == 2 * chips


def test_every_recipe_names_its_slice_and_the_table_plans_it_there():
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  import plan_table
  planned = {(config, tpu) for _, config, tpu, n, overrides in plan_table.ROWS
             if n == 1 and not overrides}
  recipes = [f'configs/{kind}/{name}' for kind in ('pretrain', 'finetune')
             for name in sorted(os.listdir(os.path.join(REPO, 'configs', kind)))
             if name.endswith('.py') and 'demo' not in name]
  assert len(recipes) == 15, recipes   # 3 pretraining + 2 tokenizers + 5 tasks x 2 sizes
  for recipe in recipes:
    tpu = load_config_file(os.path.join(REPO, recipe)).tpu_slice
    slices.parse(tpu)
    assert (recipe, tpu) in planned, f'{recipe} is made for {tpu}: plan_table.ROWS lacks it'


def test_bad_slice_names_say_what_is_accepted():
  for bad in ('v5p-7', 'v7-8', 'v5p:2x2', 'tpu'):
    with pytest.raises(ValueError, match='v5p|two per chip|dimensions'):
      slices.parse(bad)


def test_devices_are_one_per_chip():
  assert len(slices.devices(slices.parse('v4-8'))) == 4          # megacore: not 8 cores
  devs = slices.devices(slices.parse('v5p-8', num_slices=2))
  assert len(devs) == 8 and {d.slice_index for d in devs} == {0, 1}


def test_multislice_mesh_puts_data_across_slices():
  devs = slices.devices(slices.parse('v5p-8', num_slices=2))
  mesh = sharding.make_mesh((1, -1, 1), devs)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  for row in mesh.devices.reshape(2, 4):                          # fsdp stays in one slice
    assert len({d.slice_index for d in row}) == 1


def test_rules_move_an_indivisible_axis_to_another_dimension():
  sizes = {'data': 1, 'fsdp': 256, 'tensor': 1}
  # giant's FFN kernel: the width 1408 = 2^7 * 11 does not divide 256, the FFN's 6144 does.
  spec, unplaced = sharding.resolve_spec(('embed', 'mlp'), (1408, 6144), sizes)
  assert spec == P(None, 'fsdp') and not unplaced
  # The (259, 1408) position table divides by nothing: replicated, and reported.
  spec, unplaced = sharding.resolve_spec(('posemb', 'embed'), (259, 1408), sizes)
  assert spec == P(None, None)
  assert [(u.mesh_axis, u.logical_axis) for u in unplaced] == [('fsdp', 'embed')]
  # 12 heads over tensor 8: the tensor axis goes to the width instead.
  spec, _ = sharding.resolve_spec(('embed', 'heads', 'kv'), (768, 12, 64),
                                  {'data': 1, 'fsdp': 1, 'tensor': 8})
  assert spec == P('tensor', None, None)
  # Activations never move: the batch keeps (data, fsdp) or nothing.
  spec, _ = sharding.resolve_spec(('batch', 'length', 'embed'), (64, 197, 1408), sizes,
                                  move=False)
  assert spec == P(None, None, None)


def test_batch_that_does_not_split_is_refused_by_name():
  with pytest.raises(ValueError, match=r'batch_size.pair=100 .* multiple of 64'):
    sharding.check_batch({'batch_size.image': 128, 'batch_size.pair': 100},
                         {'data': 8, 'fsdp': 8, 'tensor': 1})
  with pytest.raises(ValueError, match='micro_batches=4'):
    sharding.check_batch({'batch_size': 64}, {'data': 32, 'fsdp': 1, 'tensor': 1}, 4)


def _config(path, **fields):
  """A config file's config with dotted fields replaced ('model.x' rebuilds the model)."""
  config = load_config_file(os.path.join(REPO, path))
  config.unlock()
  model = {k[len('model.'):]: v for k, v in fields.items() if k.startswith('model.')}
  if model:
    m = config.model.to_dict()
    variant = m.pop('variant')
    config.model = get_config(variant, **{**m, **model})
  for k, v in fields.items():
    if k.startswith('model.'):
      continue
    node = config
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _demo(**fields):
  return _config('configs/pretrain/demo.py', **fields)


def test_out_of_memory_messages_give_the_bytes_needed():
  gib = 2 ** 30
  # The total, as XLA:TPU states it for some programs...
  assert planner._oom_bytes('Ran out of memory in memory space hbm. Used 40.5G of 31.2G hbm.',
                            5 * gib) == int(40.5 * gib)
  # ...or only the temporaries, to which the arguments held per chip add.
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (72.26G) exceeds available HBM (30.75G).')
  assert planner._oom_bytes(message, 2 * gib) == int(72.26 * gib) + 2 * gib
  assert planner._oom_bytes('some other failure', gib) is None


def test_mesh_that_does_not_match_the_slice_is_named():
  with pytest.raises(ConfigError, match=r'mesh_shape=\(3, 1, 1\) on v5p-8'):
    planner.make_plan(_demo(mesh_shape=(3, 1, 1)), slices.parse('v5p-8'))
  with pytest.raises(ConfigError, match='batch_size.image=30'):
    planner.make_plan(_demo(**{'batch_size.image': 30}), slices.parse('v5p-8'))


def test_cli_plans_the_demo_for_a_tpu_slice():
  """The README demo's real train step, compiled for v5p-8 by the CLI, printed as JSON."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  out = subprocess.run(
      [sys.executable, '-m', 'beit3_jax.plan', '--config=configs/pretrain/demo.py',
       '--topology=v5p-8', '--json'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  plan = json.loads(out.stdout[out.stdout.index('{'):])
  for key in ('chips', 'mesh', 'peak_bytes_per_chip', 'hbm_bytes_per_chip', 'fits',
              'compile_seconds', 'hlo_flops_per_chip', 'model_flops_per_step'):
    assert key in plan, key
  assert plan['chips'] == 4 and plan['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert plan['fits'] is True and 0 < plan['peak_bytes_per_chip'] < plan['hbm_bytes_per_chip']
  assert plan['hlo_flops_per_chip'] * plan['chips'] >= 0.9 * plan['model_flops_per_step']
  assert 0 < plan['mfu_bound'] <= 1


@pytest.fixture(scope='module')
def small_plans():
  """The classification demo at 2 layers, planned on v5p-8 four ways."""
  tpu = slices.parse('v5p-8')
  variants = {
      'data': {'mesh_shape': (-1, 1, 1)},
      'fsdp': {'mesh_shape': (1, -1, 1)},
      'remat': {'mesh_shape': (-1, 1, 1), 'model.remat_policy': 'full'},
      'scan': {'mesh_shape': (-1, 1, 1), 'model.scan_layers': True},
  }
  return {name: planner.make_plan(_config('configs/finetune/classification_demo.py',
                                          **{'model.depth': 2, **fields}), tpu)
          for name, fields in variants.items()}


def test_fsdp_shards_parameters_and_optimizer_state(small_plans):
  data, fsdp = small_plans['data'], small_plans['fsdp']
  assert fsdp.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert fsdp.params_bytes_per_chip < 0.3 * data.params_bytes_per_chip
  assert fsdp.opt_state_bytes_per_chip < 0.3 * data.opt_state_bytes_per_chip
  assert fsdp.argument_bytes_per_chip < data.argument_bytes_per_chip


def test_full_remat_lowers_the_peak(small_plans):
  none, full = small_plans['data'], small_plans['remat']
  assert full.model['remat_policy'] == 'full'
  assert full.temp_bytes_per_chip < none.temp_bytes_per_chip
  assert full.peak_bytes_per_chip < none.peak_bytes_per_chip
  # Rematerialisation recomputes the forward: more HLO FLOPs for the same model FLOPs.
  assert full.hlo_flops_per_chip > none.hlo_flops_per_chip
  assert full.model_flops_per_step == none.model_flops_per_step


def test_scanned_cost_is_extrapolated_to_every_layer(small_plans):
  """XLA counts a scan's body once; the planner's extrapolated count equals the loop's."""
  loop, scan = small_plans['data'], small_plans['scan']
  assert scan.model['scan_layers'] and 'extrapolated' in scan.hlo_cost_from
  assert scan.hlo_flops_per_chip == pytest.approx(loop.hlo_flops_per_chip, rel=0.02)
