"""The training loop shared by every objective: state, resume, steps, logs, evaluation, saves.

    lock the workdir (process 0 holds <workdir>/run.lock: one run per workdir)
    state = newest readable checkpoint in the workdir (resume: params, optimizer, step, RNG,
          | else fresh init, then `init_from`           data position; an unreadable newer
          | else fresh init                             checkpoint is moved aside)
    for step in [state.step, total_steps):
        batch = next(train data) as global arrays over (data, fsdp), made and put on the
                devices ahead of the step in a thread (`data.pipeline.DevicePrefetch`); the
                time the step waits for it is `data_wait_fraction` in metrics.jsonl, and
                on the progress line above 5%
        state, metrics = train_step(state, batch, fold_in(rng, step))     (jitted, donated)
        every log_every steps: metrics.jsonl + TensorBoard + the progress line
        every checkpoint_every steps, at the end, at stop_at_step and on SIGTERM: async Orbax
            save (never of non-finite parameters); SIGTERM and stop_at_step then end the run
        every eval_every steps: validation sums over eval_batches fixed batches, or the whole
            split (eval_batches=0, fine-tuning's default), after the save; fine-tuning
            also draws examples to TensorBoard and keeps the best params (<workdir>/best)

A step whose loss or gradient is not finite skips its update (`skipped_updates` in
metrics.jsonl, `skipped` on the progress line); max_nonfinite_steps of them in a row stop the
run with a message naming the streams (`NonFiniteSteps`).

Config fields read here (declared, with their defaults, in `beit3_jax.defaults.LOOP_FIELDS`):
total_steps, checkpoint_every, keep_checkpoints, log_every, eval_every, eval_batches, seed,
mesh_shape, micro_batches, init_from, peak_tflops_per_device, compilation_cache_dir (the
train step is compiled before the first step and its compile time printed; with a cache
directory a restarted job loads it from there), stop_at_step (> 0: save and stop after
that step, as a preemption would; rerunning the command resumes), max_nonfinite_steps and
workdir_lock_lease_seconds; `evaluate_only` also reads eval_step (a finetune field).
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from etils import epath

from beit3_jax import sharding as sharding_lib
from beit3_jax import param_tree
from beit3_jax.data import paths, pipeline
from beit3_jax.models import count_params
from beit3_jax.defaults import RunError
from beit3_jax.trainer import checkpoints, fault_points
from beit3_jax.trainer import flops as flops_lib
from beit3_jax.trainer import preemption
from beit3_jax.trainer import step as step_lib
from beit3_jax.trainer import workdir_lock
from beit3_jax.trainer.progress import Progress
from beit3_jax.trainer.writers import MetricWriter


@dataclasses.dataclass
class Job:
  """What an objective's job hands to the loop.

  Attributes:
    objective: see `beit3_jax.trainer.step`.
    tx, schedule: the optimizer and its learning-rate schedule.
    train_data: the resumable training mixture (`data.pipeline.Mixture`: `next` gives host
      batches; `snapshot`, `set_state` and `close` are what the trainer also calls).
    eval_data: makes a fresh, identical validation iterator of host batches (or None).
    frozen, frozen_shardings: constant inputs of the step (e.g. the visual tokenizer).
    flops_per_step: analytic training FLOPs of one step (global batch).
    examples_per_step, tokens_per_step: global counts per step.
    describe: lines printed before the first compile.
    on_finish: called with (state, workdir) at the end (e.g. to export a tokenizer).
    evaluator: (params, mesh) -> validation metrics, for objectives whose metrics are not sums
      of batches (retrieval ranks the whole split, captioning decodes and scores CIDEr);
      replaces the eval step over `eval_data` when given.
    abstract_batch: ShapeDtypeStructs of one global batch, for a job built without data to
      compile its step ahead of time (`beit3_jax.plan`); None when it has data.
    showcase: (params, mesh) -> {tag: uint8 (H, W, 3) image}, pictures of validation examples
      with their predictions, written to TensorBoard as 'val/<tag>' after each validation
      (every process calls it; process 0 writes).
    best_metric: a validation metric (e.g. 'vqa/accuracy'; higher is better): the params of
      the best validation so far are kept in <workdir>/best (`checkpoints.BestCheckpoint`);
      '' keeps none.
  """
  objective: Any
  tx: Any
  schedule: Callable
  train_data: Any
  eval_data: Callable[[], Iterator] | None
  frozen: Any
  frozen_shardings: Any
  flops_per_step: float
  examples_per_step: int
  tokens_per_step: int
  describe: list[str] = dataclasses.field(default_factory=list)
  on_finish: Callable | None = None
  evaluator: Callable[[Any, Any], dict] | None = None
  abstract_batch: Any = None
  showcase: Callable[[Any, Any], dict] | None = None
  best_metric: str = ''


def _merge_init(fresh, loaded):
  """Fresh params with every non-None leaf of `loaded` put in its place."""
  flat = param_tree.flatten(fresh)
  for k, v in param_tree.flatten(loaded).items():
    if v is not None:
      flat[k] = v
  return param_tree.unflatten(flat)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(x), jax.device_get(tree))


def _mean_metrics(history: list, objective) -> dict[str, float]:
  """Scalars averaged over the steps since the last log; task sums summed, then summarized.
  Steps that skipped their update (a non-finite loss or gradient) are counted in
  `skipped_updates` and left out of the rest, unless every step skipped."""
  host = [_host(m) for m in history]
  kept = [h for h in host if not int(h['skipped'])] or host
  out = {k: float(np.mean([h[k] for h in kept]))
         for k in ('loss', 'grad_norm', 'param_norm', 'learning_rate')}
  totals = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *[h['tasks'] for h in kept])
  out.update(objective.summarize(totals))
  out['skipped_updates'] = float(sum(int(h['skipped']) for h in host))
  return out


class NonFiniteSteps:
  """Counts the steps that skipped their update because their loss or gradient was not
  finite, and stops the run (RunError) after `limit` of them in a row (0 = never)."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.in_a_row = 0
    self.total = 0
    self.first = 0

  def record(self, step: int, metrics) -> None:
    """`metrics` of the step that ended at `step` (read from the devices here)."""
    if not int(jax.device_get(metrics['skipped'])):
      self.in_a_row = 0
      return
    self.total += 1
    self.in_a_row += 1
    if self.in_a_row == 1:
      self.first = step
    if self.limit and self.in_a_row >= self.limit:
      tasks = _host(metrics['tasks'])
      streams = sorted(name for name, sums in tasks.items()
                       if not all(np.isfinite(x).all() for x in jax.tree.leaves(sums)))
      raise RunError(
          f'Steps {self.first} to {step}: {self.in_a_row} steps in a row had a non-finite loss '
          f'or gradient and skipped their updates (max_nonfinite_steps={self.limit}). '
          f'Non-finite at step {step}: '
          + (f'the loss of stream(s) {", ".join(streams)}' if streams else 'the gradient')
          + '. Every checkpoint holds finite parameters; lower the learning rate or check '
          'that data, then rerun (it resumes from the newest checkpoint).')


def evaluate(eval_step, state, eval_data: Callable[[], Iterator], mesh, batches: int,
             objective) -> dict[str, float]:
  """Sums of the first `batches` validation batches (<= 0: all of them, the whole split) ->
  the objective's summary."""
  totals = None
  for host_batch in itertools.islice(eval_data(), batches if batches > 0 else None):
    sums = _host(eval_step(state.params, state.extra, state.frozen,
                           pipeline.to_global(host_batch, mesh)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return objective.summarize(totals) if totals is not None else {}


def _initial_state(config, job: Job, mesh, checkpointer, step: int | None = None):
  """(state, shardings, where it came from): the checkpoint at `step` (default: the newest),
  else fresh params with `init_from` put in, else fresh params."""
  state, shardings = step_lib.create_state(job.objective, job.tx, mesh,
                                           jax.random.key(config.seed), job.frozen,
                                           job.frozen_shardings)
  abstract = checkpoints.abstract_like(step_lib.checkpoint_items(state),
                                       step_lib.checkpoint_items(shardings))
  if step is not None:
    restored = checkpointer.restore(step, abstract, job.train_data)
    return (state.replace(**restored), shardings,
            f'resumed from {checkpointer.directory / str(step)}')
  newest = checkpointer.restore_newest_readable(abstract, job.train_data)
  if newest is not None:
    start, restored = newest
    return (state.replace(**restored), shardings,
            f'resumed from {checkpointer.directory / str(start)}')
  if config.init_from:
    loaded, what = checkpoints.load_init_params(config.init_from, state.params,
                                                shardings.params)
    return state.replace(params=_merge_init(state.params, loaded)), shardings, \
        f'initialised from {what}'
  return state, shardings, 'fresh initialisation'


def _validate(job: Job, eval_step, state, mesh, batches: int) -> dict[str, float]:
  if job.evaluator is not None:
    return job.evaluator(state.params, mesh)
  return evaluate(eval_step, state, job.eval_data, mesh, batches, job.objective)


class Restored(NamedTuple):
  """The params `restore_for_eval` found: the train state, its shardings, the mesh they live on,
  its step and where it came from (e.g. 'of <workdir>/checkpoints/100')."""
  state: Any
  shardings: Any
  mesh: Any
  step: int
  origin: str


def restore_for_eval(config, workdir, job: Job) -> Restored:
  """The state to evaluate (or predict with): the checkpoint of `workdir` at config.eval_step
  (-1 = the newest readable one), else, with no checkpoint, fresh params with `init_from` put in
  (step 0). `job.train_data` may be None (the data position is then not restored).

  Raises:
    ValueError: eval_step names a step without a checkpoint (the message lists them).
    FileNotFoundError: no checkpoint and no init_from.
  """
  workdir = epath.Path(workdir)
  mode = config.get('mode', 'eval')
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  checkpointer = checkpoints.Checkpointer(workdir, every=0, keep=None)
  wanted = int(config.eval_step)
  steps = checkpointer.all_steps()
  if wanted >= 0 and wanted not in steps:
    checkpointer.close()
    raise ValueError(f'eval_step={wanted}: {checkpointer.directory} has checkpoints at '
                     f'{sorted(steps) or "no step"}.')
  if not steps and not config.init_from:
    checkpointer.close()
    raise FileNotFoundError(f'mode={mode}: {workdir} has no checkpoint and init_from is empty; '
                            'give the run to evaluate (--workdir) or weights (--config.init_from).')
  state, shardings, origin = _initial_state(config, job, mesh, checkpointer,
                                            (wanted if wanted >= 0 else None) if steps else None)
  checkpointer.close()
  return Restored(state, shardings, mesh, int(jax.device_get(state.step)),
                  origin.replace('resumed from', 'of'))


def evaluate_only(config, workdir, job: Job) -> dict:
  """`mode=eval`: validation metrics of one checkpoint of `workdir` (config.eval_step, -1 =
  the newest; with no checkpoint, the `init_from` params at step 0; `restore_for_eval`), written
  to the workdir's metrics files with the 'val' prefix at that step, as a training run's
  evaluations are."""
  workdir = epath.Path(workdir)
  state, shardings, mesh, step, origin = restore_for_eval(config, workdir, job)
  for line in job.describe:
    print(line)
  print(f'Evaluating the params {origin} at step {step}')
  eval_step = None
  if job.evaluator is None:
    with sharding_lib.use_mesh(mesh):
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(job.objective), mesh,
                                         shardings)
  with sharding_lib.use_mesh(mesh):
    summary = _validate(job, eval_step, state, mesh, config.eval_batches)
  writer = MetricWriter(str(workdir), enabled=jax.process_index() == 0)
  writer.write(step, summary, prefix='val')
  writer.close()
  return {'train': {}, 'val': summary, 'checkpoints': str(workdir / checkpoints.CHECKPOINT_DIR),
          'metrics': str(workdir / 'metrics.jsonl'), 'tensorboard': str(workdir / 'tensorboard'),
          'state': state}


def _check_finite_params(metrics, step: int) -> None:
  """RunError instead of a checkpoint of non-finite parameters (an update whose loss and
  gradient were finite can still overflow them)."""
  norm = float(jax.device_get(metrics['param_norm']))
  if not np.isfinite(norm):
    raise RunError(f'The parameters after step {step} are not finite (norm {norm}); they were '
                   'not saved, and the newest checkpoint is the last finite one. Lower the '
                   'learning rate (or clip gradients: optimizer.clip_norm), then rerun to resume.')


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory` (local or gs://; '' = off), so that a job restarted
  with the same step loads it instead of compiling again (JAX's persistent compilation cache).
  JAX fixes the directory at its first compile: call this before anything is jitted
  (`beit3_jax.main` does, before the job is built)."""
  if not directory:
    return
  jax.config.update('jax_compilation_cache_dir', str(directory))


def train(config, workdir, job: Job) -> dict:
  """Runs (or resumes) the job in `workdir`; returns the final metrics and where outputs went."""
  workdir = epath.Path(workdir)
  lock = workdir_lock.acquire(workdir, config.get('workdir_lock_lease_seconds', 0.0))
  try:
    result = _train(config, workdir, job)
  except BaseException as e:
    lost = e if isinstance(e, StorageLost) else _storage_lost(workdir, e)   # (before the loop)
    if lock is not None:
      _close_all([lambda: lock.release(storage_lost=lost is not None)], failing=True)
    if lost is not None and lost is not e:
      raise lost from e
    raise
  if lock is not None:
    lock.release()
  return result


class StorageLost(RunError):
  """The remote workdir could not be reached during the run."""


def _storage_lost(workdir: epath.Path, error: BaseException) -> StorageLost | None:
  """The one-line error to stop with when `error` is a failure to reach a remote workdir."""
  if not (paths.is_remote(str(workdir)) and paths.is_storage_error(error)):
    return None
  reason = (str(error).strip().splitlines() or [''])[0]
  return StorageLost(
      f'Lost the connection to {workdir} during the run ({type(error).__name__}: {reason}). '
      'The checkpoints that were complete are kept; rerun the same command to resume from '
      'the newest one.')


def _close_all(closers, *, failing: bool) -> None:
  """Calls each of `closers`. While an error is on its way out (`failing`), an error of a
  closer is printed as a warning instead of hiding the first (with storage gone, every close
  fails too); otherwise the first error is raised after every closer has run."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001 -- reported or re-raised below
      if failing:
        print(f'Warning: while stopping, {getattr(close, "__qualname__", close)} failed: '
              f'{type(e).__name__}: {e}', file=sys.stderr, flush=True)
      elif first is None:
        first = e
  if first is not None:
    raise first


def _data_wait_note(metrics: dict) -> dict:
  """{'data wait': '12%'} for the progress line when the steps waited for input more than
  5% of the time since the last log."""
  wait = metrics.get('data_wait_fraction', 0.0)
  return {'data wait': f'{100 * wait:.0f}%'} if wait > 0.05 else {}


def _train(config, workdir: epath.Path, job: Job) -> dict:
  mesh = sharding_lib.make_mesh(config.mesh_shape)
  checkpointer = checkpoints.Checkpointer(workdir, every=config.checkpoint_every,
                                          keep=config.keep_checkpoints)
  state, shardings, origin = _initial_state(config, job, mesh, checkpointer)
  first_step = int(jax.device_get(state.step))
  if first_step >= config.total_steps:
    print(f'The checkpoint is at step {first_step} >= total_steps={config.total_steps}: '
          'nothing left to train (raise --config.total_steps to continue, in a new workdir '
          'or with init_from, since the schedule depends on it).')

  n_params = count_params(state.params)
  peak = flops_lib.peak_flops_per_device(config.peak_tflops_per_device * 1e12)
  print(f'Devices: {jax.device_count()} x {jax.devices()[0].device_kind} over '
        f'{jax.process_count()} process(es); mesh {dict(mesh.shape)}')
  for line in job.describe:
    print(line)
  print(f'Parameters: {n_params:,} trained; state {origin} at step {first_step}')
  print(f'Analytic training FLOPs per step: {job.flops_per_step / 1e9:,.1f} GFLOP'
        + ('' if peak else ' (MFU not reported: set --config.peak_tflops_per_device for this '
                            'device kind)'))

  data = pipeline.DevicePrefetch(job.train_data, mesh)
  try:
    return _train_loop(config, workdir, job, mesh, checkpointer, state, shardings,
                       first_step, data, peak)
  finally:
    data.close()


def _train_loop(config, workdir: epath.Path, job: Job, mesh, checkpointer, state, shardings,
                first_step: int, data: pipeline.DevicePrefetch, peak: float | None) -> dict:
  """Steps first_step..total_steps (or until a stop), logging, saving and validating; `peak`:
  the device's peak FLOP/s for MFU (None: not reported)."""
  objective = job.objective
  process0 = jax.process_index() == 0
  train_step = step_lib.make_train_step(objective, job.tx, job.schedule,
                                        config.micro_batches)
  batch = next(data)
  base_rng = jax.random.wrap_key_data(jax.device_get(state.rng))
  with sharding_lib.use_mesh(mesh):
    jitted = step_lib.jit_train_step(train_step, mesh, shardings, batch)
    if first_step < config.total_steps:
      # Compiled here, timed; the jitted calls below reuse this executable.
      t_compile = time.perf_counter()
      jitted.lower(state, batch, jax.random.fold_in(base_rng, first_step)).compile()
      cache = config.get('compilation_cache_dir', '')
      print(f'Compiled the train step in {time.perf_counter() - t_compile:.1f} s'
            + (f' (compilation cache: {cache})' if cache else ''), flush=True)
    eval_step = (step_lib.jit_eval_step(step_lib.make_eval_step(objective), mesh, shardings)
                 if job.eval_data and not job.evaluator else None)
    if first_step == 0 and hasattr(objective, 'first_batch_init'):
      params, extra = jax.jit(objective.first_batch_init)(state.params, state.extra,
                                                          state.frozen, batch)
      state = state.replace(params=params, extra=extra)

  writer = MetricWriter(str(workdir), enabled=process0)
  if process0 and first_step == 0:
    writer.write_text(0, 'config', config.to_json_best_effort(indent=2))
  progress = Progress(config.total_steps, start_step=first_step, enabled=process0)
  history, last, summary = [], {}, {}
  log_every, eval_every = int(config.log_every), int(config.eval_every)
  t_log = time.perf_counter()
  steps_since_log = 0
  nonfinite = NonFiniteSteps(config.get('max_nonfinite_steps', 0))
  best = checkpoints.BestCheckpoint(workdir, job.best_metric) if job.best_metric else None
  previous = None   # (step, metrics) of the step before: read one step late, so that the
                    # host never waits for the step it has just dispatched
  stopped = ''
  watcher = preemption.PreemptionWatcher()
  try:
    for step in range(first_step, config.total_steps):
      if step > first_step:
        batch = next(data)
      with sharding_lib.use_mesh(mesh):
        state, metrics = jitted(state, batch, jax.random.fold_in(base_rng, step))
      history.append(metrics)
      steps_since_log += 1
      done = step + 1
      if previous is not None:
        nonfinite.record(*previous)
      previous = (done, metrics)
      if done == first_step + 1 or done % log_every == 0 or done == config.total_steps:
        last = _mean_metrics(history, objective)
        now = time.perf_counter()
        rate = steps_since_log / max(now - t_log, 1e-9)
        last.update({'steps_per_second': rate,
                     'examples_per_second': rate * job.examples_per_step,
                     'tokens_per_second': rate * job.tokens_per_step,
                     'tflops_per_device': rate * job.flops_per_step / jax.device_count() / 1e12})
        if peak:
          last['mfu'] = rate * job.flops_per_step / (jax.device_count() * peak)
        last['data_wait_fraction'] = min(1.0, data.take_wait() / max(now - t_log, 1e-9))
        for stream, counts in pipeline.skipped_counts(data.snapshot()).items():
          last[f'skipped/{stream}'] = float(sum(counts.values()))
        writer.write(done, last)
        history, t_log, steps_since_log = [], now, 0
      fault_points.reached('sigterm_after_step', done)
      fault_points.reached('sigterm_group_after_step', done)
      fault_points.reached('kill_after_step', done)
      if watcher.reached(done):
        stopped = watcher.signal_name
      elif done == config.stop_at_step:
        stopped = 'stop_at_step'
      force = done == config.total_steps or bool(stopped)
      if checkpointer.should_save(done, force=force):
        nonfinite.record(*previous)   # this step too, before its parameters are written
        previous = None
        _check_finite_params(metrics, done)
        checkpointer.save(done, step_lib.checkpoint_items(state),
                          pipeline.checkpoint_state(data.snapshot()), force=force)
      # After the save: an evaluation that fails never costs the step's checkpoint.
      if (not stopped and (job.eval_data or job.evaluator) and eval_every
          and (done % eval_every == 0 or done == config.total_steps)):
        with sharding_lib.use_mesh(mesh):
          summary = _validate(job, eval_step, state, mesh, config.eval_batches)
          pictures = job.showcase(state.params, mesh) if job.showcase else {}
        writer.write(done, summary, prefix='val')
        for tag, image in pictures.items():
          writer.write_image(done, f'val/{tag}', image)
        if best is not None:
          best.offer(done, summary, state.params)
      progress.update(done, loss=last.get('loss', float('nan')),
                      **({'skipped': nonfinite.total} if nonfinite.total else {}),
                      **_data_wait_note(last))
      if stopped:
        break
    if previous is not None:
      nonfinite.record(*previous)
  except BaseException as e:
    # With the storage gone, the metrics are not copied there (each try would wait for the
    # client's retries first).
    lost = _storage_lost(workdir, e)
    _close_all([watcher.close, progress.close, checkpointer.close,
                lambda: writer.close(sync=lost is None)], failing=True)
    if lost is not None:
      raise lost from e
    raise
  _close_all([watcher.close, progress.close, checkpointer.close, writer.close], failing=False)
  if stopped:
    print(f'Stopping after step {done} ({stopped}): its checkpoint is '
          f'{checkpointer.directory / str(done)}; rerun the same command to resume from it.',
          flush=True)
  elif job.on_finish is not None and int(jax.device_get(state.step)) == config.total_steps:
    job.on_finish(state, workdir)
  return {'train': last, 'val': summary, 'checkpoints': str(checkpointer.directory),
          'metrics': str(workdir / 'metrics.jsonl'), 'tensorboard': str(workdir / 'tensorboard'),
          'state': state, 'stopped': stopped, 'best': best.describe() if best else ''}
