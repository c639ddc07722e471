"""What a fine-tuning task module provides, and the parts every task shares.

A task module (`beit3_jax/tasks/<name>.py`) defines one `Task` subclass and registers an
instance (`beit3_jax.tasks.registry`). Everything specific to the task lives there:

| piece                  | `Task` member                                   | used by                   |
|------------------------|-------------------------------------------------|---------------------------|
| its model (head)       | `model(model_cfg, **head_sizes)`, `example_inputs`, `head_size_names`, `normalize_output` | fine-tuning, convert, predict |
| its batch              | `batch_fields` (the layout of `data.schema.Field`s), `default_fields` (where its inputs live in an example), `transform`, `builtin_source`, `needs_text` | fine-tuning data |
| its objective          | `objective(config)` -> a `Finetune`             | the trainer               |
| its evaluation         | `evaluator(...)` (whole-split metrics) or None (validation batches through the objective) | fine-tuning, mode=eval |
| its pictures           | `showcase(...)`: validation examples with predictions beside the truth (`describe_predictions`, an evaluator's `showcase`) | TensorBoard images of each validation |
| its cost               | `flops(config)`                                 | MFU                       |
| its unilm weights      | `unilm_head_key`, `unilm_head_sizes`            | `beit3_jax.convert`       |
| its predictions        | `predict_commands()`, `embed` features, `default_image_norm` | `beit3_jax.predict` |
| its run's head sizes   | `head_sizes(run_config)`                        | predict                   |
| its server file        | `submission(...)` -> a `Submission`, or None    | mode=submit               |

Config fields a task reads are declared in `beit3_jax.defaults.finetune_config`.

`Finetune` is the objective base class: one stream named after the task, params = the task
model's tree ({'beit3', <head params>}), no extra state, no frozen inputs. Losses are sums over
examples divided by the whole batch's count (`normalizers`), so gradient accumulation gives the
whole batch's gradient. Every objective reports `<task>/baseline_accuracy` (always predicting
the most frequent target) and `<task>/examples`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from beit3_jax.data import finetuning as inputs_lib
from beit3_jax.data import image_ops, pipeline
from beit3_jax.data.schema import Field
from beit3_jax.losses import reduce_sums
from beit3_jax.models import num_patches
from beit3_jax.models.config import config_from_dict
from beit3_jax.models.flops import beit3_forward_flops
from beit3_jax.tasks import evaluation


class PredictError(ValueError):
  """Input the predictor cannot use; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class PredictCommand:
  """A `python -m beit3_jax.predict <name> MODEL ...` command of a task.

  add_arguments(parser): adds the command's own flags (the common ones exist already).
  run(args, session) -> dict: prints and returns its results; `session` is a
    `beit3_jax.predict.Session` (the loaded model, image / text helpers, batched calls).
  """
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, Any], dict]


@dataclasses.dataclass(frozen=True)
class Submission:
  """The file an evaluation server accepts for one split (`config.mode='submit'`).

  file_name: its name in the workdir, unilm's (`submission_file_name`).
  key: the field that names an entry (e.g. 'question_id'); of entries with the same key only the
    first is written, as unilm's `dump_predictions` keeps them.
  predict: (params, mesh) -> the entries, JSON-ready dicts in the split's order (e.g.
    {'question_id': int, 'answer': str}); every host gets them all.
  """
  file_name: str
  key: str
  predict: Callable[[Any, Any], list[dict]]


def submission_file_name(prefix: str, split: str) -> str:
  """unilm's 'submit_<prefix>_<split>.json' ('submit_vqav2_test.json'); characters of a TFDS
  split spec other than letters, digits, '_', '-' and '.' become '_' ('test[:10]' ->
  'test_10')."""
  clean = re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_')
  if not clean:
    raise ValueError(f'data.eval_split={split!r} gives no file name; expected a split name.')
  return f'submit_{prefix}_{clean}.json'


def json_id(value, field: str, index: int) -> int | str:
  """An example's id (a question_id, image_id) as the servers want it: int for integers (numpy
  ones included), str for text (TFDS gives bytes).

  Raises:
    ValueError: any other value, naming the field and the example's index.
  """
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f'Example {index}: {field!r} is a bool; expected an int or text id.')
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  raise ValueError(f'Example {index}: {field!r} holds {type(value).__name__} '
                   f'{str(value)[:40]!r}; expected one int or text id (set data.fields to the '
                   'field that holds it).')


def predict_split(source, prepare: Callable[[int, Any], list[tuple[dict, Any]]],
                  fn: Callable[[dict], Any], batch_size: int, mesh, *, threads: int = 1,
                  chunk_batches: int = 2, what: str = 'examples'
                  ) -> tuple[np.ndarray, list[Any]]:
  """fn's outputs for every example of `source`, in order, never holding the whole split.

  Args:
    source: random-access examples (`len`, `source[i]`).
    prepare: (i, example i) -> its rows [(inputs {name: array}, record)]: inputs go to `fn`,
      the record (e.g. the example's id) comes back beside its output. Run on `threads` host
      threads, `chunk_batches` global batches of examples at a time; the next chunk is prepared
      while the devices run this one.
    fn: a global batch {name: (batch_size, ...)} -> (batch_size, ...) outputs; run through
      `evaluation.batched` (the last batch of a chunk padded, outputs gathered on every host).
    what: the rows' name in the progress lines.

  Returns:
    (outputs (R, ...) numpy, records (R,)) for the R rows of all examples.
  """
  n = len(source)
  if n == 0:
    raise ValueError('The split has no example to predict.')
  step = max(1, int(batch_size) * int(chunk_batches))
  starts = list(range(0, n, step))
  outs, records, shown = [], [], 0
  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    submit = lambda s: [pool.submit(lambda i: prepare(i, source[i]), i)  # noqa: E731
                        for i in range(s, min(n, s + step))]
    pending = submit(starts[0])
    for k in range(len(starts)):
      rows = [row for f in pending for row in f.result()]
      pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
      if not rows:
        continue
      inputs = {name: np.stack([r[0][name] for r in rows]) for name in rows[0][0]}
      outs.append(evaluation.batched(fn, inputs, batch_size, mesh))
      records.extend(r[1] for r in rows)
      done = min(n, starts[k] + step)
      if done == n or done * 10 // n > shown:
        shown = done * 10 // n
        print(f'Predicted {len(records)} {what} of {done} / {n} examples', flush=True)
  if not outs:
    raise ValueError('No example of the split gave anything to predict.')
  return np.concatenate(outs), records


def histogram(targets, num: int, weights=None):
  """(num,) int32 counts of the int targets (B,); `weights` (B,) 0/1 counts only some."""
  ones = jnp.ones(targets.shape, jnp.int32) if weights is None else weights.astype(jnp.int32)
  return jnp.zeros((num,), jnp.int32).at[targets].add(ones)


def example_weights(batch, n: int) -> jax.Array:
  """(n,) float32: a validation batch's `valid` (its padding rows and rejected examples 0,
  `data.pipeline.Stream(pad_final_batch=True)`), else ones."""
  if 'valid' in batch:
    return batch['valid'].astype(jnp.float32)
  return jnp.ones((n,), jnp.float32)


def summarize_sums(sums, names: Mapping[str, str]) -> dict[str, float]:
  """Task sums -> '<task>/<metric>' floats; `names` maps a sum to its metric name."""
  metrics = {}
  for task, s in sums.items():
    count = max(float(s['count']), 1.0)
    for key, name in names.items():
      metrics[f'{task}/{name}'] = float(s[key]) / count
    if 'histogram' in s:          # evaluation sums
      metrics[f'{task}/baseline_accuracy'] = float(np.max(np.asarray(s['histogram']))) / count
    elif 'baseline_correct' in s:  # training steps (`reduce` kept only the histogram's max)
      metrics[f'{task}/baseline_accuracy'] = float(s['baseline_correct']) / count
    metrics[f'{task}/examples'] = float(s['count'])
  return metrics


class Finetune:
  """What every fine-tuning objective shares (see the module docstring).

  Attributes:
    task: the task's name; the batch holds one stream under it.
    model_cfg: the backbone config; model: the task's Flax model (`Task.model`).
    example_inputs: zero inputs that initialise every parameter of `model`.
    image_mean, image_std: normalisation of the uint8 images, on the device.
  """

  def __init__(self, task: 'Task', model_cfg, *, head_sizes: Mapping[str, int] | None = None,
               text_len: int = 8, image_mean=image_ops.BEIT3_MEAN,
               image_std=image_ops.BEIT3_STD):
    self.task = task.name
    self.model_cfg = model_cfg
    self.model = task.model(model_cfg, **dict(head_sizes or {}))
    self.example_inputs = task.example_inputs(model_cfg, text_len=text_len)
    self.image_mean = tuple(image_mean)
    self.image_std = tuple(image_std)

  @property
  def tasks(self) -> tuple[str, ...]:
    return (self.task,)

  def init_params(self, rng):
    """Boxed params (logical axis names on every leaf)."""
    return self.model.init(rng, **self.example_inputs)['params']

  def init_extra(self, params):
    del params
    return {}

  def normalizers(self, batch) -> dict[str, jax.Array]:
    """Examples of the whole batch (the loss denominator)."""
    n = jax.tree.leaves(batch[self.task])[0].shape[0]
    return {self.task: jnp.asarray(float(n), jnp.float32)}

  def images(self, x):
    """uint8 (B, S, S, C) -> normalised float32."""
    return image_ops.normalize(x, self.image_mean, self.image_std)

  def apply(self, params, rng, train: bool, **inputs):
    rngs = {'drop_path': rng} if train else None
    return self.model.apply({'params': params}, deterministic=not train, rngs=rngs, **inputs)

  def finish(self, params, extra):
    return params, extra

  def reduce(self, sums):
    if all('histogram' in s for s in sums.values()):
      return reduce_sums(sums)
    return sums


def zero_inputs(config, batch_size: int, text_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(images (B, S, S, C) float32, ids (B, text_len) int32, padding (B, text_len) bool), zeros."""
  s, c = config.img_size, config.in_chans
  return (jnp.zeros((batch_size, s, s, c), jnp.float32),
          jnp.zeros((batch_size, text_len), jnp.int32),
          jnp.zeros((batch_size, text_len), bool))


class Task:
  """A fine-tuning task (see the module docstring for what each member is for).

  Subclasses set the class attributes and implement `model`, `example_inputs`, `objective`
  and `transform`; the rest have defaults that fit a task without whole-split evaluation,
  head sizes or predict commands.
  """

  name: str = ''
  head_size_names: tuple[str, ...] = ()     # model() keywords that size the head
  normalize_output: bool = True             # False: unilm's model drops the final backbone norm
  needs_text: bool = True                   # False: no SentencePiece model is needed
  builtin_source: str = 'builtin:images'    # the built-in data set the demos use
  default_fields: Mapping[str, str] = {}    # input name -> where it lives in an example
  batch_fields: Mapping[str, Field] = {}    # the batch layout of the stream (`data.schema`)
  unilm_head_key: str = ''                  # a key only this task's unilm state dicts have
  unilm_head_sizes: Mapping[str, str] = {}  # head size name -> unilm key whose rows give it
  # (mean, std, where they come from) for converted weights, which carry no run config
  default_image_norm: tuple[tuple[float, ...], tuple[float, ...], str] | None = None
  default_eval_crop_pct: float = 0.0        # their predict view (`data.eval_crop_pct`)
  best_metric: str = ''                     # its validation metric kept best (`best_metric`)
  random_erasing: bool = False              # its objective erases (`data.random_erasing`)
  pairs_field: str = ''                     # default_fields key of the captions training reads
                                            # as (image, caption) pairs (`data.caption_pairs`)

  # ---------------------------------------------------------------------------- the model

  def model(self, model_cfg, **head_sizes) -> nn.Module:
    """The task's Flax model on the backbone `model_cfg` ({'beit3', <head params>})."""
    raise NotImplementedError

  def example_inputs(self, model_cfg, batch_size: int = 1, text_len: int = 8) -> dict:
    """Zero inputs that initialise every parameter of `model(model_cfg, ...)`."""
    raise NotImplementedError

  def check_head_sizes(self, head_sizes: Mapping[str, Any] | None) -> dict[str, int]:
    """`head_sizes` checked: exactly `head_size_names`, ints >= 1; returns a copy."""
    sizes = {k: int(v) for k, v in (head_sizes or {}).items()}
    if set(sizes) != set(self.head_size_names) or any(v < 1 for v in sizes.values()):
      raise ValueError(f'task {self.name!r} takes head sizes {sorted(self.head_size_names)} '
                       f'(ints >= 1), got {dict(head_sizes or {})}.')
    return sizes

  def head_sizes(self, config) -> dict[str, int]:
    """The head sizes of a fine-tuning config (a ConfigDict or a run's config.json dict)."""
    del config
    return {}

  def abstract_params(self, model_cfg, head_sizes: Mapping[str, Any] | None = None):
    """Shapes (jax.ShapeDtypeStruct, unboxed) of the task model's params; nothing is
    allocated."""
    sizes = tuple(sorted(self.check_head_sizes(head_sizes).items()))
    tree = _abstract_params(self, json.dumps(model_cfg.to_dict(), sort_keys=True), sizes)
    return jax.tree.map(lambda x: x, tree)   # a fresh tree of the (immutable) leaves

  # ------------------------------------------------------------------------- training

  def objective(self, config) -> Finetune:
    """The objective of a fine-tuning config (`beit3_jax.defaults.finetune_config`)."""
    raise NotImplementedError

  def transform(self, config, inputs: inputs_lib.FinetuneInputs, fields: Mapping[str, str],
                tokenizer) -> pipeline.Transform:
    """(example, rng) -> one example of `batch_fields` (or a `pipeline.Skip`)."""
    raise NotImplementedError

  def evaluator(self, config, objective: Finetune, eval_source, train_source, tokenizer,
                fields: Mapping[str, str]) -> Callable[[Any, Any], dict] | None:
    """A whole-split evaluator (params, mesh) -> metrics, or None: the validation batches go
    through the objective (`eval_batches` of them)."""
    del config, objective, eval_source, train_source, tokenizer, fields
    return None

  def submission(self, config, objective: Finetune, source, tokenizer, fields: Mapping[str, str],
                 split: str) -> Submission | None:
    """The evaluation server's file of every example of `source` (the split named `split`;
    examples without answers or references are fine), or None: the task has none (unilm
    writes none for it) and mode=submit stops naming the task."""
    del config, objective, source, tokenizer, fields, split
    return None

  def showcase(self, config, objective: Finetune, eval_source, tokenizer,
               fields: Mapping[str, str], evaluator=None
               ) -> Callable[[Any, Any], list] | None:
    """(params, mesh) -> `tasks.showcase.Example`s for the TensorBoard images of a validation:
    the first SHOWCASE_EXAMPLES usable validation examples with the model's predictions beside
    the truth, or None (the task draws none).

    A whole-split evaluator that has a `showcase` attribute (() -> Examples of its last
    evaluation) gives them; otherwise the objective's `logits(params, batch)` over those
    examples (in the evaluation view) go to `describe_predictions`."""
    if evaluator is not None:
      last = getattr(evaluator, 'showcase', None)
      return None if last is None else (lambda params, mesh: last())
    if not hasattr(objective, 'logits'):
      return None
    transform = self.transform(config, evaluation.eval_inputs(config), fields, tokenizer)
    arrays = first_examples(eval_source, transform, SHOWCASE_EXAMPLES)
    logits_fn = jax.jit(objective.logits)

    def run(params, mesh):
      data_ways = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape]))
      n = next(iter(arrays.values())).shape[0]
      logits = evaluation.batched(lambda batch: logits_fn(params, batch), arrays,
                                  -(-n // data_ways) * data_ways, mesh)
      return self.describe_predictions(config, arrays, np.asarray(logits, np.float32),
                                       tokenizer)
    return run

  def describe_predictions(self, config, examples: Mapping[str, np.ndarray],
                           logits: np.ndarray, tokenizer) -> list:
    """`tasks.showcase.Example`s of N examples (`batch_fields` arrays, (N, ...)) and the
    model's logits (N, ...) float32: each image with the truth and the prediction."""
    raise NotImplementedError

  def flops(self, config) -> tuple[float, int]:
    """(analytic forward FLOPs, backbone tokens) of one example."""
    m = config.model
    text_len = int(config.data.text_len) if self.needs_text else 0
    return (beit3_forward_flops(m, images=True, text_len=text_len),
            1 + num_patches(m) + text_len)

  def describe(self, config) -> str:
    """A short note on the task's setting for the run's start (e.g. '1000 classes')."""
    del config
    return ''

  # ---------------------------------------------------------------------------- predict

  def predict_commands(self) -> Sequence[PredictCommand]:
    return ()

  def embed(self, model_cfg) -> tuple[Callable, Callable] | None:
    """(image_fn(params, images), text_fn(params, ids, padding)) giving unit-norm features
    for `predict embed`, or None: the backbone's l2-normalised CLS outputs are used."""
    del model_cfg
    return None


@functools.lru_cache(maxsize=8)
def _abstract_params(task: Task, config_json: str, sizes: tuple):
  """`Task.abstract_params`, cached by value (tracing a model takes about a second)."""
  config = config_from_dict(json.loads(config_json))
  model = task.model(config, **dict(sizes))
  inputs = task.example_inputs(config)
  variables = jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.key(0))
  return nn.meta.unbox(variables['params'])


SHOWCASE_EXAMPLES = 8   # examples drawn in the TensorBoard images of each validation


def first_examples(source, transform: pipeline.Transform, count: int
                   ) -> dict[str, np.ndarray]:
  """The first `count` examples of `source` that `transform` (with a fixed rng) does not
  reject, stacked: {field: (n, ...)}, n <= count."""
  rows = []
  for i in range(len(source)):
    example = transform(source[i], np.random.default_rng(0))
    if not isinstance(example, pipeline.Skip):
      rows.append(example)
    if len(rows) == count:
      break
  if not rows:
    raise ValueError('No example of the evaluation split can be used.')
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def top_k_text(scores: np.ndarray, names: Sequence[str], k: int) -> str:
  """'name (p), name (p), ...' of the k best of (C,) scores (softmax probabilities)."""
  p = np.exp(scores - scores.max())
  p /= p.sum()
  best = np.argsort(-scores, kind='stable')[:k]
  return ', '.join(f'{names[i]} ({p[i]:.2f})' for i in best)


def field_map(task: Task, config) -> dict[str, str]:
  """Where the task's inputs live in an example: its defaults, overridden by
  `config.data.fields`."""
  return inputs_lib.field_overrides(config.data.fields, task.default_fields)


def random_erasing(task: Task, config):
  """`data.finetuning.random_erasing(config)` for a task whose objective erases (unilm erases
  only in its ImageNet recipe); ValueError naming the field for a task that does not."""
  erasing = inputs_lib.random_erasing(config)
  if erasing is not None and not task.random_erasing:
    raise ValueError(f'data.random_erasing={config.data.random_erasing}: task {task.name!r} '
                     'does not erase (unilm erases only in ImageNet classification); set it '
                     'to 0.')
  return erasing


def objective_inputs(config) -> dict:
  """The `Finetune` keywords every task's objective takes from a config."""
  d = config.data
  return dict(image_mean=tuple(d.image_mean), image_std=tuple(d.image_std))
