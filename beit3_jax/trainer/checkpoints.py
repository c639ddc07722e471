"""Orbax checkpoints of a training run: the state, the data iterator, and `init_from`.

Layout of a workdir (local or gs://):

    <workdir>/checkpoints/<step>/state/   params, opt_state, extra, step, rng (Orbax PyTree)
    <workdir>/checkpoints/<step>/data/    position.json: each stream's global input position
    <workdir>/best/<step>/state/          fine-tuning: the params of the best validation so far
    <workdir>/best/best.json              (`BestCheckpoint`): its metric, value and step

Saves are asynchronous (`every` steps, and `force=True` at the end), the newest `keep` are
kept, and a run restarted in the same workdir resumes from the newest one that can be read
(damaged ones are moved aside to <workdir>/checkpoints_unreadable/): parameters,
optimizer state, step, RNG and the data iterator, so the batches continue exactly where they
stopped. Restoring reads each array straight into the shardings of the current mesh, so a
checkpoint written on one mesh shape restores on another.

`init_from` starts a new run from existing weights (the optimizer starts fresh):
  - a workdir of ours (its newest checkpoint) or one step directory `<workdir>/checkpoints/<N>`:
    all of its params if it is a checkpoint of the same model, else only its `beit3` backbone
    (e.g. a pretraining run under a fine-tuning model; only the backbone is read, and the
    task heads keep their fresh init);
  - a params directory (`beit3_jax.params_io`: config.json + params/), e.g. the convert CLI's
    output for a PyTorch checkpoint; a backbone-only tree goes under the model's `beit3`.
A vision position table stored for another image size (another patch grid) is resized
bicubically to the model's, as unilm's `load_model_and_may_interpolate` does; every other
leaf must have the model's shape.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import optax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from beit3_jax import param_tree, params_io
from beit3_jax.defaults import RunError
from beit3_jax.models import layer_stack, positions
from beit3_jax.trainer import fault_points

CHECKPOINT_DIR = 'checkpoints'
UNREADABLE_DIR = 'checkpoints_unreadable'
BEST_DIR = 'best'


class DataPositionHandler(ocp.CheckpointHandler):
  """Orbax handler of the data position (`data.pipeline.checkpoint_state`): one JSON file,
  `position.json`, written by process 0. The position is global, so any number of processes
  can resume from it. Saving runs `on_save` first (a test's fault point)."""

  FILE = 'position.json'

  def save(self, directory: epath.Path, item=None, args: 'DataPositionSave' = None) -> None:
    del item
    if args.on_save is not None:
      args.on_save()
    if jax.process_index() == 0:
      (directory / self.FILE).write_text(json.dumps(args.state, indent=1))

  def restore(self, directory: epath.Path, item=None,
              args: 'DataPositionRestore' = None) -> dict:
    del item, args
    path = directory / self.FILE
    if not path.exists() and list(directory.glob('process_*-of-*.json')):
      return {'format': 'per_host'}   # an earlier version's; `Mixture.set_state` explains
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
  state: dict
  on_save: Callable[[], None] | None = None


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """A `CheckpointManager` over `<workdir>/checkpoints` for `TrainState.checkpoint_items`."""

  def __init__(self, workdir, *, every: int, keep: int | None = 3, async_save: bool = True):
    """keep: checkpoints kept (None = all, e.g. when only reading)."""
    self.directory = epath.Path(workdir) / CHECKPOINT_DIR
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, self.every),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, force=force)` writes a checkpoint."""
    return force or self.manager.should_save(step)

  def save(self, step: int, items: dict, data_state: dict | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `items` (and the data position, `data.pipeline.checkpoint_state`) at
    `step`; returns whether it saves."""
    args = {'state': ocp.args.StandardSave(items)}
    if data_state is not None:
      fault = lambda: fault_points.reached('kill_in_checkpoint_save', step)  # noqa: E731
      args['data'] = DataPositionSave(data_state, on_save=fault)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore_newest_readable(self, abstract_items: dict, mixture=None) -> tuple[int, dict] | None:
    """(step, items) of the newest checkpoint that restores (see `restore`), or None when
    there is no checkpoint.

    A newer checkpoint that cannot be read (cut short, a file truncated, an item missing) is
    reported by step and path and moved aside to `<workdir>/checkpoints_unreadable/<step>`,
    never deleted. When no checkpoint restores, nothing is moved and the newest one's error is
    raised: then the cause is more likely the run (e.g. its config) than the files.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        items = self.restore(step, abstract_items, mixture)
      except RunError:
        raise   # the run's settings, not the files (e.g. another batch size)
      except Exception as e:  # noqa: BLE001 -- a damaged file surfaces as many error types
        failures.append((step, e))
        continue
      for bad, error in failures:
        self._set_aside(bad, error)
      return step, items
    if failures:
      step, error = failures[0]
      raise RunError(f'No checkpoint in {self.directory} could be restored; the newest, '
                         f'step {step}, failed with: {_first_line(error)}') from error
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    source = self.directory / str(step)
    target_dir = self.directory.parent / UNREADABLE_DIR
    target = target_dir / str(step)
    if jax.process_index() == 0:
      target_dir.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target = target_dir / f'{step}-{int(time.time())}'
      source.rename(target)
      print(f'Checkpoint at step {step} ({source}) could not be read ({_first_line(error)}); '
            f'moved it to {target}.', flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self.manager.reload()

  def restore(self, step: int, abstract_items: dict, mixture=None) -> dict:
    """The items at `step`, laid out as `abstract_items` (ShapeDtypeStructs with shardings);
    the mixture (if given) is moved to the saved position."""
    args = {'state': ocp.args.StandardRestore(abstract_items)}
    if mixture is not None:
      args['data'] = DataPositionRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    if mixture is not None:
      mixture.set_state(restored['data'])
    return restored['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class BestCheckpoint:
  """The params of the validation with the highest `metric` so far, beside the latest
  checkpoints (unilm's checkpoint-best): `<workdir>/best/<step>/state/` holds {'params'}, so
  `<workdir>/best` is a step's checkpoint for predict, convert/export and init_from, and
  `<workdir>/best/best.json` says {metric, value, step}. A resumed run keeps the best so far.

  A new best is written (by every process, synchronously) before the one it replaces is
  removed, so a crash at any moment leaves a best checkpoint.
  """

  FILE = 'best.json'

  def __init__(self, workdir, metric: str):
    self.directory = epath.Path(workdir) / BEST_DIR
    self.metric = metric
    self.value, self.step = None, None
    record = self.directory / self.FILE
    if record.exists():
      saved = json.loads(record.read_text())
      if saved.get('metric') == metric:
        self.value, self.step = float(saved['value']), int(saved['step'])

  def offer(self, step: int, metrics: dict, params) -> bool:
    """Saves `params` as the best when `metrics[metric]` beats the best so far (strictly);
    returns whether it did. A summary without the metric is an error naming what it has."""
    if self.metric not in metrics:
      raise RunError(f'best_metric={self.metric!r} is not among the validation metrics '
                     f'{sorted(metrics)}; set --config.best_metric to one of them (or none).')
    value = float(metrics[self.metric])
    if not np.isfinite(value) or (self.value is not None and value <= self.value):
      return False
    if step == self.step:   # (a resumed run validating its best step again) never in place
      return False
    with ocp.PyTreeCheckpointer() as checkpointer:
      checkpointer.save(self.directory / str(step) / 'state', {'params': params}, force=True)
    previous = self.step
    self.value, self.step = value, int(step)
    if jax.process_index() == 0:
      (self.directory / self.FILE).write_text(json.dumps(
          {'metric': self.metric, 'value': value, 'step': int(step)}, indent=1))
      if previous is not None and previous != step and (self.directory / str(previous)).exists():
        (self.directory / str(previous)).rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'best checkpoint {step}')
    return True

  def describe(self) -> str:
    """'<dir>/<step> (<metric> <value> at step <step>)', or '' before the first."""
    if self.step is None:
      return ''
    return (f'{self.directory / str(self.step)} ({self.metric} {self.value:.4f} at step '
            f'{self.step})')


def _first_line(error: Exception, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'.strip().splitlines()[0]
  return text if len(text) <= limit else text[:limit] + '...'


def abstract_like(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree` with `shardings` (the restore target). An optimizer state's
  `optax.MaskedNode` (a parameter the optimizer does not update; it holds no array) stays as it
  is, whatever `shardings` has in its place."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return jax.tree.map(
      lambda x, s: x if masked(x) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings, is_leaf=masked)


def load_init_params(init_from: str, abstract_params, shardings) -> tuple[Any, str]:
  """Parameters for `init_from` laid out as `abstract_params`; and a line saying what loaded.

  Args:
    init_from: see the module docstring.
    abstract_params: the model's params tree (ShapeDtypeStruct or arrays).
    shardings: NamedShardings of the params tree.

  Raises:
    FileNotFoundError: nothing loadable at the path (the message says what was looked for).
    ValueError: the tree does not fit the model (names the missing or mis-shaped leaves).
  """
  path = epath.Path(init_from)
  if not path.exists():
    raise FileNotFoundError(f'init_from={init_from!r} does not exist.')
  step_dir = params_io.find_step_dir(path)
  if step_dir is not None:
    return _restore_checkpoint_params(step_dir, abstract_params, shardings, init_from)
  if (path / params_io.CONFIG_FILE).exists():
    if params_io.read_kind(path) != 'beit3':
      raise ValueError(f'init_from={init_from!r} holds a {params_io.read_kind(path)} '
                       'checkpoint, not BEiT-3 weights.')
    model_cfg = params_io.load_model_config(str(path))
    loaded = _in_layout_of(params_io.load_params(str(path), model_cfg), abstract_params)
    return _place_params(loaded, abstract_params, shardings, init_from, f'params directory {path}')
  raise FileNotFoundError(
      f'init_from={init_from!r}: no checkpoint ({CHECKPOINT_DIR}/<step>/state) and no params '
      f'directory ({params_io.CONFIG_FILE} + params/) there.')


def _restore_checkpoint_params(step_dir, abstract_params, shardings, source: str):
  """The params of a training checkpoint, read straight into `shardings`.

  A checkpoint of the same model gives every leaf. Another model's checkpoint with a `beit3`
  backbone (a pretraining run: {'beit3', 'mim_head', 'mlm_head'}, or another task) gives only
  the backbone -- nothing else is read -- and the other heads come back as None leaves, so
  they keep their fresh init.
  """
  with ocp.PyTreeCheckpointer() as checkpointer:
    stored = checkpointer.metadata(step_dir / 'state').item_metadata.tree['params']
  if layer_stack.is_scanned(stored) != layer_stack.is_scanned(abstract_params):
    # The other layer layout (loop <-> scan): read on the host, restack, then place.
    with ocp.PyTreeCheckpointer() as checkpointer:
      item = {'params': stored}
      restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
          item=item, partial_restore=True,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
    loaded = _in_layout_of(restored['params'], abstract_params)
    return _place_params(loaded, abstract_params, shardings, source,
                         f'params of checkpoint {step_dir} (layers restacked for '
                         f'scan_layers={layer_stack.is_scanned(abstract_params)})')
  want, have = param_tree.flatten(abstract_params), param_tree.flatten(stored)
  if set(want) <= set(have):
    target = abstract_like(abstract_params, shardings)
    what = f'params of checkpoint {step_dir}'
  elif 'beit3' in stored and 'beit3' in abstract_params:
    target = {'beit3': abstract_like(abstract_params['beit3'], shardings['beit3'])}
    fresh = sorted(set(abstract_params) - {'beit3'})
    what = f'the backbone (beit3) of checkpoint {step_dir}; {fresh} start fresh'
  else:
    raise ValueError(f'init_from={source!r}: its checkpoint {step_dir} holds params '
                     f'{sorted(stored)}, which neither match the model\'s {sorted(abstract_params)} '
                     'nor hold a `beit3` backbone.')
  flat_target = param_tree.flatten(target)
  resize = _position_table_resize(flat_target, have)
  if resize:
    # Read the stored table as it is (replicated), resize it on the host below.
    model_leaf = flat_target[resize]
    flat_target[resize] = jax.ShapeDtypeStruct(
        tuple(have[resize].shape), model_leaf.dtype,
        sharding=jax.sharding.NamedSharding(model_leaf.sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(model_leaf.sharding, jax.sharding.NamedSharding) else model_leaf.sharding)
    what += '; ' + _resize_note(have[resize].shape, model_leaf.shape)
  _check_fits(flat_target, have, f'{source!r} (checkpoint {step_dir})')
  target = {'params': param_tree.unflatten(flat_target)}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        step_dir / 'state', args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
  got = param_tree.flatten(restored['params'])
  if resize:
    got[resize] = jax.device_put(
        positions.resize_table(np.asarray(got[resize]), want[resize].shape[0]).astype(
            want[resize].dtype), model_leaf.sharding)
  return param_tree.unflatten({k: got.get(k) for k in want}), what


def _in_layout_of(loaded, abstract_params):
  """`loaded` in the layer layout (loop or scan, `models.layer_stack`) of the model."""
  return layer_stack.to_layout(loaded, scan=layer_stack.is_scanned(abstract_params),
                               num_vl_layers=layer_stack.num_vl_layers_of(abstract_params))


def _position_table_resize(want, have) -> str | None:
  """The flat name of the vision position table when `want` (the model) and `have` (the
  stored tree) hold it with different patch grids of the same width -- another image size,
  which unilm resizes bicubically when it loads weights -- else None."""
  name = f'beit3/{positions.TABLE_NAME}'
  if name not in want or name not in have:
    return None
  (rows, width), (stored_rows, stored_width) = want[name].shape, np.shape(have[name])
  if rows == stored_rows or width != stored_width:
    return None
  grids = positions.square_grid_side(rows), positions.square_grid_side(stored_rows)
  return name if None not in grids else None


def _resize_note(stored_shape, model_shape) -> str:
  g, new_g = (positions.square_grid_side(s[0]) for s in (stored_shape, model_shape))
  return (f'vision position table resized from {g}x{g} to {new_g}x{new_g} patches '
          '(bicubic, as unilm)')


def _check_fits(want, have, source: str) -> None:
  """ValueError naming the leaves of `want` (flat name -> shaped) that `have` lacks or holds in
  another shape (leaves `have` holds beyond `want` are not read)."""
  param_tree.check_fits(want, have, f'init_from={source}', 'the model (config.model)',
                        allow_unexpected=True, error=ValueError, limit=8)


def _place_params(loaded, abstract_params, shardings, source: str, what: str):
  """Puts a loaded tree into the model's tree: a backbone-only tree fills `beit3`; the
  heads the checkpoint lacks keep their fresh init (returned as None leaves to fill).
  Returns (params, `what` plus a note on a resized position table)."""
  want = param_tree.flatten(abstract_params)
  have = param_tree.flatten(loaded)
  if 'beit3' in {k.split('/')[0] for k in want} and not any(k.startswith('beit3/') for k in have):
    have = {f'beit3/{k}': v for k, v in have.items()}
  shard = param_tree.flatten(shardings)
  resize = _position_table_resize(want, have)
  if resize:
    what += '; ' + _resize_note(np.shape(have[resize]), want[resize].shape)
    have = {**have, resize: positions.resize_table(have[resize], want[resize].shape[0])}
  _check_fits({k: v for k, v in want.items() if k.startswith('beit3/') or k in have}, have,
              repr(source))
  out = {k: jax.device_put(np.asarray(have[k], want[k].dtype), shard[k]) if k in have else None
         for k in want}
  return param_tree.unflatten(out), what
