"""The `finetune` job: BEiT-3 fine-tuning on one task of `beit3_jax.tasks` (configs/finetune/).

The task (`config.task`, looked up in the task registry) gives the model, its objective, the
per-example transform of its data, its whole-split evaluator if it has one and its FLOPs; this
module wires them to the data sources and the shared trainer (`beit3_jax.trainer.loop`).
Config fields: `beit3_jax.defaults.finetune_fields`.

`config.mode='train'` trains (validating every `eval_every` steps); `'eval'` evaluates one
checkpoint (`eval_step`) and stops; `'submit'` restores the same params, predicts every example
of `data.eval_split` (e.g. VQAv2's 'test', whose questions have no answers) and writes the file
an evaluation server accepts, as unilm writes it, into the workdir (`submit`).

`init_from` may be a pretraining workdir (params {'beit3', 'mim_head', 'mlm_head'}) or another
task's: only its `beit3` backbone is read and the task head keeps its fresh init
(`trainer.checkpoints.load_init_params`). A fine-tuning checkpoint of the same task gives every
param; a params directory (the convert CLI's output) gives what it holds.
"""

from __future__ import annotations

import json
import os

import jax
from etils import epath

from beit3_jax import sharding as sharding_lib
from beit3_jax import tasks
from beit3_jax.data import builtin as builtin_lib
from beit3_jax.data import paths
from beit3_jax.data import schema
from beit3_jax.data import finetuning as inputs_lib
from beit3_jax.data.text import TextTokenizer
from beit3_jax.defaults import ConfigError, RunError
from beit3_jax.jobs.data_splits import open_split
from beit3_jax.models import num_patches
from beit3_jax.tasks import base as task_base
from beit3_jax.tasks import showcase
from beit3_jax.trainer import checkpoints, loop
from beit3_jax.trainer.optimizer import make_optimizer

MODES = ('train', 'eval', 'submit')


class SubmissionExistsError(RunError, FileExistsError):
  """mode=submit found its file in the workdir already (the command line prints the message)."""


def resolve_source(data_cfg) -> tuple[str, str, str]:
  """(TFDS dir, TFDS name, spm path or ''), building the built-in data if it is used."""
  tfds_dir, names, spm_path = builtin_lib.resolve_names(
      {'data.source': data_cfg.source}, data_cfg.data_dir or None,
      data_cfg.builtin_image_size, data_cfg.spm_path)
  return tfds_dir, names['data.source'], spm_path


def make_data(config, task: task_base.Task, source, train: bool, seed: int,
              text_tokenizer=None):
  """Training data (shuffled, repeated, augmented) or one validation epoch (eval transform;
  every example once, the last batch padded with `valid=False` rows).

  Training of a task with a `pairs_field` (retrieval, captioning) reads one example per
  (image, caption) pair (`inputs_lib.CaptionPairs`) when `data.caption_pairs` is True."""
  fields = task_base.field_map(task, config)
  transform = task.transform(config, inputs_lib.FinetuneInputs.from_config(config, train),
                             fields, text_tokenizer)
  pairs = config.data.get('caption_pairs', True)
  if not isinstance(pairs, bool):
    raise ConfigError(f'data.caption_pairs={pairs!r}: expected True or False.')
  pairs_field = task.pairs_field
  if train and pairs and pairs_field:
    source = inputs_lib.CaptionPairs(source, fields[pairs_field])
  return inputs_lib.make_stream_mixture(
      task.name, source, transform, int(config.batch_size), seed,
      num_epochs=None if train else 1, read_threads=config.data.read_threads,
      workers=int(config.data.workers) if train else 0,
      on_bad_example=config.data.on_bad_example, pad_final_batch=not train)


def text_tokenizer(config, task: task_base.Task, spm_path: str):
  """The task's SentencePiece tokenizer (None when the task reads no text), checked against
  the model's text embedding."""
  if not task.needs_text:
    return None
  if not spm_path:
    raise ValueError(f'data.spm_path is empty: task {task.name!r} needs the SentencePiece '
                     'model of its texts (beit3.spm for converted unilm weights).')
  tokenizer = TextTokenizer.from_file(spm_path)
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'{tokenizer.vocab_size} ids of {spm_path}.')
  return tokenizer


def _check_batch(config, mesh_shape) -> None:
  try:
    sharding_lib.check_batch({'batch_size': int(config.batch_size)}, mesh_shape,
                             int(config.micro_batches))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def abstract_batch(config, task: task_base.Task) -> dict:
  """ShapeDtypeStructs of one global batch of the task: {task name: its `batch_fields`}, as
  the task's stream mixture yields it."""
  m = config.model
  sizes = {'B': int(config.batch_size), 'H': m.img_size, 'W': m.img_size,
           'L': config.data.text_len, 'N': num_patches(m),
           'A': task.head_sizes(config).get('num_answers', 0)}
  return {task.name: {k: jax.ShapeDtypeStruct(shape, dtype)
                     for k, (shape, dtype) in schema.shapes(dict(task.batch_fields),
                                                            sizes).items()}}


def _step_parts(config, mesh_shape):
  """(task, objective, tx, schedule, FLOPs per step, tokens per step) of a config."""
  task = tasks.get(config.task)
  if config.mode not in MODES:
    raise ValueError(f'config.mode={config.mode!r}; expected one of {MODES}.')
  _check_batch(config, mesh_shape)
  try:
    task_base.random_erasing(task, config)   # every task: refused where it does not apply
  except ValueError as e:
    raise ConfigError(str(e)) from None
  objective = task.objective(config)
  tx, schedule = make_optimizer(config.optimizer, config.total_steps, config.model.depth)
  b = int(config.batch_size)
  forward, tokens = task.flops(config)
  return task, objective, tx, schedule, 3.0 * forward * b, tokens * b


def plan_job(config, mesh) -> loop.Job:
  """The job of `config` without data, for compiling its step ahead of time
  (`beit3_jax.plan`): `abstract_batch` set, no data iterators or evaluator."""
  task, objective, tx, schedule, flops, tokens = _step_parts(config, dict(mesh.shape))
  return loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=None,
                  eval_data=None, frozen={}, frozen_shardings={}, flops_per_step=flops,
                  examples_per_step=int(config.batch_size), tokens_per_step=tokens,
                  abstract_batch=abstract_batch(config, task))


def build_job(config) -> loop.Job:
  """The loop's job for a fine-tuning config."""
  task, objective, tx, schedule, flops, tokens = _step_parts(
      config, dict(sharding_lib.make_mesh(config.mesh_shape).shape))
  tfds_dir, name, spm_path = resolve_source(config.data)
  tokenizer = text_tokenizer(config, task, spm_path)
  d = config.data
  train_source = open_split(name, d.train_split, 'data.train_split', tfds_dir)
  # mode=eval reads no training batch (the train split still gives captioning its baseline)
  train_data = (make_data(config, task, train_source, True, config.seed, tokenizer)
                if config.mode == 'train' else None)
  eval_data, evaluator, pictures = None, None, None
  if config.eval_every or config.mode == 'eval':
    eval_source = open_split(name, d.eval_split, 'data.eval_split', tfds_dir)
    fields = task_base.field_map(task, config)
    evaluator = task.evaluator(config, objective, eval_source, train_source, tokenizer, fields)
    if evaluator is None:
      eval_data = lambda: make_data(config, task, eval_source, False,  # noqa: E731
                                    config.seed + 1, tokenizer)
    pictures = showcase_job(task, task.showcase(config, objective, eval_source, tokenizer,
                                                fields, evaluator))
  b = int(config.batch_size)
  m = config.model
  what = task.describe(config)
  describe = [
      f'Model: {m.variant} D={m.embed_dim} depth={m.depth} heads={m.num_heads} '
      f'{m.img_size}px/{m.patch_size} vocab {m.vocab_size}; dtype {m.dtype}; '
      f'normalize_output={m.normalize_output}',
      f'Task: {task.name} ({type(objective).__name__}); data {name} '
      f'{d.train_split} / {d.eval_split} x{b} (TFDS dir {tfds_dir})'
      + (f'; {what}' if what else '') + (f'; text {spm_path}' if tokenizer else ''),
  ]
  return loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=train_data,
                  eval_data=eval_data, frozen={}, frozen_shardings={},
                  flops_per_step=flops, examples_per_step=b, tokens_per_step=tokens,
                  describe=describe, evaluator=evaluator, showcase=pictures,
                  best_metric=best_metric(config, task))


def best_metric(config, task: task_base.Task) -> str:
  """The validation metric whose best params the run keeps ('<task>/<metric>'), or '' for
  none: `config.best_metric`, '' = the task's `best_metric`, 'none' = none."""
  name = config.get('best_metric', '') or task.best_metric
  if not name or name == 'none':
    return ''
  return name if '/' in name else f'{task.name}/{name}'


def showcase_job(task: task_base.Task, examples_fn):
  """The loop's `showcase` from a task's (`Task.showcase`): {'<task>/examples': a grid of
  the examples and their predictions}, or None."""
  if examples_fn is None:
    return None

  def pictures(params, mesh) -> dict:
    examples = examples_fn(params, mesh)
    return {f'{task.name}/examples': showcase.grid_image(examples)} if examples else {}
  return pictures


def submit(config, workdir) -> dict:
  """`mode=submit`: the task's evaluation-server file of every example of `data.eval_split`
  (`Task.submission`), predicted with the params `loop.restore_for_eval` gives (checkpoint
  `eval_step`, -1 = the newest, else `init_from`), written by process 0 as
  <workdir>/<unilm's name>, e.g. submit_vqav2_test.json (a JSON list, indent 2, as unilm's
  `dump_predictions`). The training split is not read.

  Returns {'submission': the file's path, 'entries': count, 'step', 'origin'} and, for the
  command line's report, empty 'train' / 'val' metrics and the run's paths.

  Raises:
    ConfigError: the task has no server file (unilm writes none for it).
    SubmissionExistsError (a FileExistsError): the file is there already (from an earlier
      submit); it is never overwritten: move it away first. Checked before anything is
      restored or predicted, and again when writing.
  """
  task, objective, tx, schedule, flops, tokens = _step_parts(
      config, dict(sharding_lib.make_mesh(config.mesh_shape).shape))
  tfds_dir, name, spm_path = resolve_source(config.data)
  tokenizer = text_tokenizer(config, task, spm_path)
  split = config.data.eval_split
  source = open_split(name, split, 'data.eval_split', tfds_dir)
  submission = task.submission(config, objective, source, tokenizer,
                               task_base.field_map(task, config), split)
  if submission is None:
    raise ConfigError(f'mode=submit: task {task.name!r} has no evaluation-server file (unilm '
                      "writes none for it); mode='eval' gives its metrics.")
  directory = epath.Path(workdir)
  path = directory / submission.file_name
  if path.exists():
    raise SubmissionExistsError(f'{path} exists already; mode=submit never overwrites it: move '
                                'it away (or use another --workdir) and run again.')
  job = loop.Job(objective=objective, tx=tx, schedule=schedule, train_data=None,
                 eval_data=None, frozen={}, frozen_shardings={}, flops_per_step=flops,
                 examples_per_step=int(config.batch_size), tokens_per_step=tokens)
  state, _, mesh, step, origin = loop.restore_for_eval(config, directory, job)
  print(f'Task: {task.name}; predicting {name} {split} ({len(source)} examples) with the params '
        f'{origin} at step {step}')
  with sharding_lib.use_mesh(mesh):
    entries = submission.predict(state.params, mesh)
  kept, seen = [], set()
  for entry in entries:
    if entry[submission.key] not in seen:
      seen.add(entry[submission.key])
      kept.append(entry)
  if len(kept) < len(entries):
    print(f'{len(entries) - len(kept)} entries repeat a {submission.key} of an earlier one: '
          'only the first of each is written.')
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(kept, indent=2, ensure_ascii=False)
    if paths.is_remote(str(path)):
      if path.exists():
        raise SubmissionExistsError(f'{path} appeared while predicting; it is left as it is.')
      path.write_text(text)
    else:
      try:
        with open(os.fspath(path), 'x', encoding='utf-8') as f:  # never over one made meanwhile
          f.write(text)
      except FileExistsError:
        raise SubmissionExistsError(f'{path} appeared while predicting; it is left as it is.'
                                    ) from None
  print(f'Wrote {len(kept)} predictions to {path}')
  return {'submission': str(path), 'entries': len(kept), 'step': step, 'origin': origin,
          'train': {}, 'val': {}, 'checkpoints': str(directory / checkpoints.CHECKPOINT_DIR),
          'metrics': str(directory / 'metrics.jsonl'),
          'tensorboard': str(directory / 'tensorboard')}


def run(config, workdir) -> dict:
  """Trains (config.mode='train'), evaluates one checkpoint (config.mode='eval') or writes the
  evaluation server's file of one (config.mode='submit')."""
  if config.mode == 'submit':
    return submit(config, workdir)
  job = build_job(config)
  if config.mode == 'eval':
    return loop.evaluate_only(config, workdir, job)
  return loop.train(config, workdir, job)
