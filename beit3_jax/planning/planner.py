"""Compile a job's real train step for a TPU slice, ahead of time, and read what it costs.

    plan = make_plan(config, slices.parse('v5p-512'))

builds the job of `config` without data or weights (`jobs.<job>.plan_job`: the objective,
optimizer, frozen inputs as shapes, one global batch as shapes), the device mesh of
`config.mesh_shape` over the slice's devices (libtpu's, no TPU needed), and then exactly what
the trainer jits: `trainer.step.make_train_step` under `jit_train_step`'s shardings, lowered
from ShapeDtypeStructs and compiled by XLA's TPU compiler. Nothing is allocated.

From the compiled step (per chip): argument, output, aliased (donated) and temporary bytes,
the peak (argument + output - alias + temp) against the chip's HBM, the HLO FLOPs and bytes
of memory traffic (`cost_analysis`), and from those the roofline lower bound on the step time,
max(FLOPs / peak FLOP/s, bytes / HBM bandwidth), with the model FLOP utilisation it implies
(the job's analytic model FLOPs over that time). Two things it does not see: communication
between chips (FSDP's all-gathers and reduce-scatters ride on ICI, overlapped with compute
when XLA can) and the FLOPs inside Pallas kernels (`attention='splash'`), which
`cost_analysis` does not count.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from beit3_jax import sharding as sharding_lib
from beit3_jax.defaults import ConfigError
from beit3_jax.jobs import finetuning, pretraining, tokenizer_training
from beit3_jax.models import get_config as model_config
from beit3_jax.models.config import remat_policy
from beit3_jax.planning.slices import Slice, devices
from beit3_jax.trainer import step as step_lib

# Jobs whose step can be planned -> the module with their `plan_job(config, mesh)`.
PLANNABLE = {'pretrain': pretraining, 'finetune': finetuning, 'tokenizer': tokenizer_training}
HEADROOM = 0.10   # a plan fits when its peak leaves at least this share of HBM free


@dataclasses.dataclass
class Plan:
  """What compiling the step for a slice showed (bytes and FLOPs per chip unless said)."""
  job: str
  slice: str
  topology: str
  num_slices: int
  chips: int
  mesh: dict[str, int]
  model: dict[str, Any]
  params_bytes_per_chip: int
  opt_state_bytes_per_chip: int
  batch_bytes_per_chip: int
  frozen_bytes_per_chip: int
  argument_bytes_per_chip: int
  output_bytes_per_chip: int
  alias_bytes_per_chip: int
  temp_bytes_per_chip: int
  peak_bytes_per_chip: int
  hbm_bytes_per_chip: int
  fits: bool
  lower_seconds: float
  compile_seconds: float
  hlo_flops_per_chip: float
  hlo_bytes_accessed_per_chip: float
  hlo_cost_from: str
  model_flops_per_step: float
  roofline_step_seconds: float
  roofline_bound: str
  mfu_bound: float
  replicated_params: dict[str, str]
  advice: list[str]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _bytes_per_chip(tree, shardings) -> int:
  """Bytes one chip holds of `tree` (ShapeDtypeStructs) laid out by `shardings` (a prefix of
  `tree`: a sharding may stand for an empty subtree, such as optax's MaskedNode)."""
  def size(s, x):
    if not hasattr(x, 'shape'):
      return 0
    shard = s.shard_shape(x.shape) if isinstance(s, NamedSharding) else x.shape
    return int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return int(sum(jax.tree.leaves(jax.tree.map(size, shardings, tree))))


def _with_shardings(tree, shardings):
  return jax.tree.map(
      lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, 'shape')
      else x, shardings, tree)


def _oom_bytes(message: str, state_bytes: int) -> int | None:
  """The bytes a TPU compile said it needed when it ran out of HBM, if it says: its total, or,
  when it names only the temporaries, those plus `state_bytes` (what the step's arguments hold
  per chip), a lower bound on the peak."""
  scale = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
  m = re.search(r'Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm', message)
  if m:
    return int(float(m.group(1)) * scale[m.group(2)])
  m = re.search(r'HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM', message)
  if m:
    return int(float(m.group(1)) * scale[m.group(2)]) + state_bytes
  return None


def _model_of(config):
  """The config of the trained model: `model`, or the tokenizer job's `tokenizer`."""
  return config.model if 'model' in config else config.tokenizer


def _scans(config) -> bool:
  return 'model' in config and bool(config.model.get('scan_layers', False))


def _advice(config, plan_fits: bool, peak: int, hbm: int, replicated: dict[str, str],
            mesh: dict[str, int]) -> list[str]:
  tips = []
  if not plan_fits:
    policy = remat_policy(config.model) if 'model' in config else 'none'
    tips.append(f'Peak {peak / 2**30:.1f} GiB per chip leaves less than {HEADROOM:.0%} of the '
                f'{hbm / 2**30:.0f} GiB HBM free. To fit:')
    if mesh.get('data', 1) > 1:
      tips.append(f'  more FSDP: move devices from data to fsdp (--config.mesh_shape, now '
                  f'{tuple(mesh.values())}) to shard parameters and optimizer state further;')
    if policy in ('none', 'dots_saveable', 'dots_with_no_batch_dims_saveable'):
      tips.append(f"  a remat policy that saves less: --config.model.remat_policy=full (now "
                  f"'{policy}');")
    tips.append(f'  smaller micro-batches: --config.micro_batches={2 * int(config.micro_batches)}'
                ' (same global batch, less activation memory);')
    if config.optimizer.get('mu_dtype', 'float32') == 'float32':
      tips.append("  Adam's first moment in bfloat16: --config.optimizer.mu_dtype=bfloat16.")
  big = {k: v for k, v in replicated.items()}
  if big:
    tips.append(f'{len(big)} parameter(s) are replicated over a mesh axis that divides none of '
                'their dimensions (listed under replicated_params); choose mesh sizes that '
                'divide the model width to shard them.')
  return tips


@dataclasses.dataclass
class _Compiled:
  job: Any
  state: Any
  shardings: Any
  batch: Any
  compiled: Any
  oom: str | None
  lower_seconds: float
  compile_seconds: float


def _say(message: str) -> None:
  """Progress on stderr (stdout carries the plan, e.g. its JSON)."""
  print(message, file=sys.stderr, flush=True)


def _compile_step(config, mesh) -> _Compiled:
  """Lowers and compiles the train step of `config` over `mesh`, from shapes only."""
  job = PLANNABLE[config.job].plan_job(config, mesh)
  rng = jax.random.key(int(config.seed))
  shardings = step_lib.state_shardings(job.objective, job.tx, mesh, rng, job.frozen_shardings)
  state = step_lib.abstract_state(job.objective, job.tx, rng).replace(frozen=None)
  state = _with_shardings(state, shardings.replace(frozen=None)).replace(frozen=job.frozen)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       job.abstract_batch)
  key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  train_step = step_lib.make_train_step(job.objective, job.tx, job.schedule,
                                        int(config.micro_batches))
  t0 = time.perf_counter()
  with sharding_lib.use_mesh(mesh):
    jitted = step_lib.jit_train_step(train_step, mesh, shardings, batch)
    lowered = jitted.lower(state, batch, key)
  t1 = time.perf_counter()
  compiled, oom = None, None
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA:TPU refuses a program that cannot fit in HBM
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'Ran out of memory' not in str(e):
      raise
    oom = str(e)
  t2 = time.perf_counter()
  return _Compiled(job, state, shardings, batch, compiled, oom, t1 - t0, t2 - t1)


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def _variant(config, **fields):
  """A copy of `config` with model fields and top-level fields replaced."""
  copy = config.copy_and_resolve_references()
  model = {k: v for k, v in fields.items() if k.startswith('model.')}
  if model:
    m = copy.model.to_dict()
    m.pop('variant', None)
    m.update({k[len('model.'):]: v for k, v in model.items()})
    copy.model = model_config(config.model.variant, **m)
  for k, v in fields.items():
    if not k.startswith('model.'):
      *parents, leaf = k.split('.')
      node = copy
      for p in parents:
        node = node[p]
      node[leaf] = v
  return copy


def _batch_fields(config) -> dict[str, int]:
  if isinstance(config.batch_size, int):
    return {'batch_size': int(config.batch_size)}
  return {f'batch_size.{k}': int(v) for k, v in config.batch_size.items()}


def hlo_cost(config, mesh) -> tuple[float, float, str]:
  """(HLO FLOPs, bytes accessed) per chip of one step, and how they were obtained.

  XLA's cost analysis counts the body of a loop once, whatever its trip count, so a step with
  scanned layers or micro-batches (both loops) is under-counted. Then the cost is measured on
  the loop layout at one and two layers per group and one micro-batch of the same size, and
  extrapolated: cost is linear in the layers of each group and in the micro-batches (the
  optimizer update, counted once per micro-batch this way, is negligible beside the layers).
  """
  micro = int(config.micro_batches)
  if 'model' not in config:   # the tokenizer job: no scanned layers to extrapolate over
    flops, traffic = _cost(_compile_step(config, mesh).compiled)
    return flops * micro, traffic * micro, f'the step as compiled, x {micro} micro-batches'
  m = config.model
  if not m.get('scan_layers', False) and micro == 1:
    return (*_cost(_compile_step(config, mesh).compiled), 'the step as compiled')
  plain, vl = m.depth - m.num_vl_layers, m.num_vl_layers
  base = {'model.scan_layers': False, 'micro_batches': 1,
          **{k: v // micro for k, v in _batch_fields(config).items()}}

  def cost(n_plain, n_vl):
    _say(f'Measuring the cost per layer: compiling the loop layout at {n_plain}+{n_vl} layers')
    c = _compile_step(_variant(config, **base, **{'model.depth': n_plain + n_vl,
                                                  'model.num_vl_layers': n_vl}), mesh)
    if c.compiled is None:
      raise RuntimeError(f'the cost compile ({n_plain}+{n_vl} layers) ran out of memory.')
    return np.array(_cost(c.compiled))

  points = []
  if plain and vl:
    c11, c21, c12 = cost(1, 1), cost(2, 1), cost(1, 2)
    total = c11 + (plain - 1) * (c21 - c11) + (vl - 1) * (c12 - c11)
    points = ['1+1', '2+1', '1+2']
  else:
    key = (lambda n: cost(n, 0)) if plain else (lambda n: cost(0, n))
    c1, c2 = key(1), key(2)
    total = c1 + ((plain or vl) - 1) * (c2 - c1)
    points = ['1', '2']
  how = f'extrapolated from the loop layout at {", ".join(points)} layers per group'
  if micro > 1:
    how += f', one micro-batch (1/{micro} of the batch) x {micro}'

  return float(total[0] * micro), float(total[1] * micro), how


def make_plan(config, tpu: Slice) -> Plan:
  """Compiles the train step of `config` for `tpu` and returns its `Plan`.

  Raises ConfigError for what the config gets wrong on this slice (a job that cannot be
  planned, a mesh that does not match the chips, a batch that does not split over the mesh).
  """
  job_name = config.get('job', '')
  if job_name not in PLANNABLE:
    raise ConfigError(f'job={job_name!r} has no train step to plan; plannable jobs: '
                      f'{sorted(PLANNABLE)}.')
  devs = devices(tpu)
  try:
    mesh = sharding_lib.make_mesh(config.mesh_shape, devs)
  except ValueError as e:
    raise ConfigError(f'mesh_shape={tuple(config.mesh_shape)} on {tpu.name} '
                      f'({tpu.chips} chips, {tpu.num_slices} slice(s)): {e}') from None
  mesh_sizes = {k: int(v) for k, v in mesh.shape.items()}
  _say(f'Compiling the {job_name} step for {tpu.topology_name}'
       + (f' x {tpu.num_slices} slices' if tpu.num_slices > 1 else '')
       + f' ({tpu.chips} chips, mesh {mesh_sizes}) on this host\'s CPU...')
  c = _compile_step(config, mesh)
  _say(f'Compiled in {c.compile_seconds:.1f} s' + (' (out of memory)' if c.oom else ''))
  job, state, shardings, batch = c.job, c.state, c.shardings, c.batch
  rng = jax.random.key(int(config.seed))
  boxed = step_lib.boxed_abstract_state(job.objective, job.tx, rng)
  replicated = {
      name: ', '.join(f'{u.mesh_axis} ({mesh_sizes[u.mesh_axis]}) meant for {u.logical_axis}'
                      for u in missed) + f'; shape {missed[0].shape}'
      for name, missed in sharding_lib.unplaced(boxed.params, mesh_sizes).items()}

  chip = tpu.chip
  batch_sharding = sharding_lib.batch_sharding(mesh)
  params_bytes = _bytes_per_chip(state.params, shardings.params)
  opt_bytes = _bytes_per_chip(state.opt_state, shardings.opt_state)
  batch_bytes = _bytes_per_chip(batch, jax.tree.map(lambda _: batch_sharding, batch))
  frozen_bytes = _bytes_per_chip(job.frozen, job.frozen_shardings) if job.frozen else 0
  flops = traffic = 0.0
  cost_from = 'not measured (the step does not fit)'
  if c.compiled is not None:
    mem = c.compiled.memory_analysis()
    argument, output = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    peak = argument + output - alias + temp
    if not _scans(config) and int(config.micro_batches) == 1:
      flops, traffic = _cost(c.compiled)
      cost_from = 'the step as compiled'
    else:
      flops, traffic, cost_from = hlo_cost(config, mesh)
  else:
    argument = output = alias = temp = 0
    peak = _oom_bytes(c.oom, params_bytes + opt_bytes + batch_bytes + frozen_bytes) or -1
  fits = c.compiled is not None and 0 <= peak <= (1 - HEADROOM) * chip.hbm_bytes
  t_compute, t_memory = flops / chip.peak_flops, traffic / chip.hbm_bandwidth
  step_time = max(t_compute, t_memory)
  model_flops = float(job.flops_per_step)
  mfu = (model_flops / tpu.chips / chip.peak_flops) / step_time if step_time > 0 else 0.0
  m = _model_of(config)
  return Plan(
      job=job_name, slice=tpu.name, topology=tpu.topology_name, num_slices=tpu.num_slices,
      chips=tpu.chips, mesh=mesh_sizes,
      model=dict(variant=m.get('variant', ''), depth=m.depth, embed_dim=m.embed_dim,
                 dtype=m.get('dtype', 'float32'), scan_layers=_scans(config),
                 remat_policy=remat_policy(m) if 'model' in config else 'none',
                 attention=m.get('attention', 'xla'), micro_batches=int(config.micro_batches),
                 mu_dtype=config.optimizer.get('mu_dtype', 'float32')),
      params_bytes_per_chip=params_bytes, opt_state_bytes_per_chip=opt_bytes,
      batch_bytes_per_chip=batch_bytes, frozen_bytes_per_chip=frozen_bytes,
      argument_bytes_per_chip=argument, output_bytes_per_chip=output,
      alias_bytes_per_chip=alias, temp_bytes_per_chip=temp, peak_bytes_per_chip=peak,
      hbm_bytes_per_chip=int(chip.hbm_bytes), fits=fits,
      lower_seconds=round(c.lower_seconds, 2), compile_seconds=round(c.compile_seconds, 2),
      hlo_flops_per_chip=flops, hlo_bytes_accessed_per_chip=traffic, hlo_cost_from=cost_from,
      model_flops_per_step=model_flops, roofline_step_seconds=step_time,
      roofline_bound='compute' if t_compute >= t_memory else 'memory', mfu_bound=mfu,
      replicated_params=replicated,
      advice=_advice(config, fits, peak, int(chip.hbm_bytes), replicated, mesh_sizes)
      + ([f'XLA could not fit the step: {c.oom.splitlines()[0][:300]}'] if c.oom else []))


def describe(plan: Plan) -> list[str]:
  """The plan as lines for a terminal."""
  gib = lambda b: f'{b / 2**30:.2f} GiB'  # noqa: E731
  lines = [
      f'{plan.job} on {plan.slice} ({plan.topology}'
      + (f' x {plan.num_slices} slices' if plan.num_slices > 1 else '') + f'): {plan.chips} '
      f'chips, mesh {plan.mesh}',
      'model ' + ', '.join(f'{k}={v}' for k, v in plan.model.items()),
      f'per chip: params {gib(plan.params_bytes_per_chip)}, optimizer state '
      f'{gib(plan.opt_state_bytes_per_chip)}, batch {gib(plan.batch_bytes_per_chip)}, frozen '
      f'{gib(plan.frozen_bytes_per_chip)}, temporaries {gib(plan.temp_bytes_per_chip)}',
      f'peak {gib(plan.peak_bytes_per_chip)} of {gib(plan.hbm_bytes_per_chip)} HBM '
      f'({plan.peak_bytes_per_chip / plan.hbm_bytes_per_chip:.0%}): '
      + ('fits' if plan.fits else 'DOES NOT FIT') + f' (needs {HEADROOM:.0%} headroom)',
      f'lowering {plan.lower_seconds:.1f} s, compile {plan.compile_seconds:.1f} s',
      f'HLO {plan.hlo_flops_per_chip / 1e12:.2f} TFLOP and '
      f'{plan.hlo_bytes_accessed_per_chip / 2**30:.1f} GiB of HBM traffic per chip per step; '
      f'model {plan.model_flops_per_step / 1e12:.1f} TFLOP per step (all chips)',
      f'  (HLO cost: {plan.hlo_cost_from})',
      f'roofline: step >= {plan.roofline_step_seconds * 1e3:.1f} ms ({plan.roofline_bound}-'
      f'bound), MFU <= {plan.mfu_bound:.1%}',
  ]
  for name, why in sorted(plan.replicated_params.items())[:8]:
    lines.append(f'  replicated: {name}: {why}')
  if len(plan.replicated_params) > 8:
    lines.append(f'  ... and {len(plan.replicated_params) - 8} more replicated parameters')
  lines.extend(plan.advice)
  return lines
