"""What a fine-tuning task module provides, and the parts every task shares.

A task module (`beit3_jax/tasks/<name>.py`) defines one `Task` subclass and registers an
instance (`beit3_jax.tasks.registry`). Everything specific to the task lives there:

| piece                  | `Task` member                                   | used by                   |
|------------------------|-------------------------------------------------|---------------------------|
| its model (head)       | `model(model_cfg, **head_sizes)`, `example_inputs`, `head_size_names`, `normalize_output` | fine-tuning, convert, predict |
| its batch              | `batch_fields` (the layout of `data.schema.Field`s), `default_fields` (where its inputs live in an example), `transform`, `builtin_source`, `needs_text` | fine-tuning data |
| its objective          | `objective(config)` -> a `Finetune`             | the trainer               |
| its evaluation         | `evaluator(...)` (whole-split metrics) or None (validation batches through the objective) | fine-tuning, mode=eval |
| its cost               | `flops(config)`                                 | MFU                       |
| its unilm weights      | `unilm_head_key`, `unilm_head_sizes`            | `beit3_jax.convert`       |
| its predictions        | `predict_commands()`, `embed` features, `default_image_norm` | `beit3_jax.predict` |
| its run's head sizes   | `head_sizes(run_config)`                        | predict                   |

Config fields a task reads are declared in `beit3_jax.defaults.finetune_config`.

`Finetune` is the objective base class: one stream named after the task, params = the task
model's tree ({'beit3', <head params>}), no extra state, no frozen inputs. Losses are sums over
examples divided by the whole batch's count (`normalizers`), so gradient accumulation gives the
whole batch's gradient. Every objective reports `<task>/baseline_accuracy` (always predicting
the most frequent target) and `<task>/examples`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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


def histogram(targets, num: int):
  """(num,) int32 counts of the int targets (B,)."""
  return jnp.zeros((num,), jnp.int32).at[targets].add(1)


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


def field_map(task: Task, config) -> dict[str, str]:
  """Where the task's inputs live in an example: its defaults, overridden by
  `config.data.fields`."""
  return inputs_lib.field_overrides(config.data.fields, task.default_fields)


def objective_inputs(config) -> dict:
  """The `Finetune` keywords every task's objective takes from a config."""
  d = config.data
  return dict(image_mean=tuple(d.image_mean), image_std=tuple(d.image_std))
