"""The Flax params checkpoint: what `python -m beit3_jax.convert to-flax` writes.

A directory (local or gs://) holding

    config.json    the model config (`beit3_jax.models.get_config(...).to_dict()`); a visual
                   tokenizer's also holds "kind": "vqkd"; a fine-tuned model's (backbone +
                   task head, `convert to-flax --task`) also holds "task" (a name of
                   `beit3_jax.models.heads.TASKS`) and "head_sizes" (e.g. {"num_answers": 3129})
    params/        an Orbax StandardCheckpointer tree of float32 arrays, the Flax param layout
                   (with a task: the task model's tree {'beit3': backbone, <head params>})
    vq_stats/      (visual tokenizers only) the codebook's EMA buffers, another Orbax tree

Training workdirs keep their whole run config in `config.json` with the model config under
`model`; `load_model_config` reads either.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from typing import Any

import jax
import numpy as np
from etils import epath

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


KINDS = ('beit3', 'vqkd')
# config.json fields of a task model's params directory (not model config fields).
TASK_FIELD = 'task'
HEAD_SIZES_FIELD = 'head_sizes'
# The head size each task takes (`heads.task_model` keyword); tasks not listed take none.
HEAD_SIZE_NAMES = {'classification': ('num_classes',), 'vqa': ('num_answers',)}


def save_params(directory, params, config, *, overwrite: bool = False, kind: str = 'beit3',
                extra: dict | None = None, task: str | None = None,
                head_sizes: dict | None = None) -> epath.Path:
  """Writes `params` and `config` as a params checkpoint directory; returns its path.

  Args:
    kind: 'beit3' (the backbone) or 'vqkd' (a visual tokenizer; recorded in config.json).
    extra: other variable collections to save beside params, e.g. {'vq_stats': ...}.
    task: a fine-tuning task (`heads.TASKS`): `params` is then that task model's whole tree
      {'beit3': ..., <head params>}, and config.json records the task and `head_sizes`.
    head_sizes: the task model's sizes, {'num_classes': int} (classification),
      {'num_answers': int} (vqa), {} otherwise.

  Raises FileExistsError if the directory exists and is not empty, unless `overwrite`.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; expected one of {KINDS}.')
  if task is not None:
    if kind != 'beit3':
      raise ValueError(f'task={task!r} needs kind beit3, got {kind!r}.')
    head_sizes = check_head_sizes(task, head_sizes)
  import orbax.checkpoint as ocp
  path = epath.Path(directory).absolute() if '://' not in str(directory) else epath.Path(directory)
  if path.exists() and any(path.iterdir()):
    if not overwrite:
      raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True (--overwrite) '
                            'to replace it.')
    path.rmtree()
  path.mkdir(parents=True, exist_ok=True)
  fields = config.to_dict() if kind == 'beit3' else {'kind': kind, **config.to_dict()}
  if task is not None:
    fields.update({TASK_FIELD: task, HEAD_SIZES_FIELD: head_sizes})
  (path / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True))
  trees = {PARAMS_DIR: params, **(extra or {})}
  with ocp.StandardCheckpointer() as checkpointer:
    for name, tree in trees.items():
      checkpointer.save(path / name, jax.tree.map(np.asarray, jax.device_get(tree)))
  return path


def read_kind(directory) -> str:
  """'beit3' or 'vqkd': what a params checkpoint directory (or workdir) holds."""
  config_file = epath.Path(directory) / CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f'{directory}: no {CONFIG_FILE}.')
  return json.loads(config_file.read_text()).get('kind', 'beit3')


def check_head_sizes(task: str, head_sizes: dict | None) -> dict:
  """`head_sizes` checked for `task`: exactly the sizes it takes (ints > 0); returns a copy."""
  from beit3_jax.models.heads import TASKS
  if task not in TASKS:
    raise ValueError(f'task={task!r}; known: {TASKS}.')
  head_sizes = {k: int(v) for k, v in (head_sizes or {}).items()}
  want = set(HEAD_SIZE_NAMES.get(task, ()))
  if set(head_sizes) != want or any(v < 1 for v in head_sizes.values()):
    raise ValueError(f'task {task!r} takes head sizes {sorted(want)} (ints >= 1), got '
                     f'{head_sizes}.')
  return head_sizes


def abstract_task_params(task: str, config, head_sizes: dict | None = None):
  """Shapes (jax.ShapeDtypeStruct, unboxed) of `heads.task_model(task, config, **head_sizes)`'s
  params: {'beit3': backbone, <head params>}. Nothing is allocated."""
  sizes = tuple(sorted(check_head_sizes(task, head_sizes).items()))
  tree = _abstract_task_params(task, json.dumps(config.to_dict(), sort_keys=True), sizes)
  return jax.tree.map(lambda x: x, tree)   # a fresh tree of the (immutable) leaves


@functools.lru_cache(maxsize=8)
def _abstract_task_params(task: str, config_json: str, sizes: tuple):
  """`abstract_task_params`, cached by value (tracing a model takes about a second)."""
  import flax.linen as nn
  from beit3_jax.models import heads
  from beit3_jax.models.config import config_from_dict
  config = config_from_dict(json.loads(config_json))
  model = heads.task_model(task, config, **dict(sizes))
  inputs = heads.task_example_inputs(task, config)
  variables = jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.key(0))
  return nn.meta.unbox(variables['params'])


def read_task(directory) -> tuple[str | None, dict]:
  """(task, head sizes) recorded in a params checkpoint directory's config.json; (None, {}) for
  a backbone-only one (or a visual tokenizer's)."""
  config_file = epath.Path(directory) / CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f'{directory}: no {CONFIG_FILE}.')
  fields = json.loads(config_file.read_text())
  task = fields.get(TASK_FIELD)
  if task is None or 'model' in fields:  # a training run's config: its task is not ours
    return None, {}
  return task, dict(fields.get(HEAD_SIZES_FIELD) or {})


def _restore(path: epath.Path, abstract, config) -> Any:
  """Restores an Orbax tree into `abstract`'s structure, checking every leaf's shape."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      tree = checkpointer.restore(path, abstract)
    except (ValueError, KeyError) as e:
      raise ValueError(f'The arrays in {path} do not fit the model config '
                       f'(variant={config.variant}): {e}') from e
  # Orbax restores saved numpy arrays at their stored shapes whatever the target says.
  misshaped = [f'{jax.tree_util.keystr(k)} {tuple(np.shape(x))} (expected {tuple(a.shape)})'
               for (k, x), a in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                                    jax.tree.leaves(abstract))
               if tuple(np.shape(x)) != tuple(a.shape)]
  if misshaped:
    raise ValueError(f'The arrays in {path} do not fit the model config '
                     f'(variant={config.variant}): wrong shape: ' + ', '.join(misshaped))
  return tree


def load_vqkd(directory, config=None):
  """(params, vq_stats, config) of a visual tokenizer's params checkpoint directory."""
  from beit3_jax.tokenizers import abstract_variables
  path = epath.Path(directory)
  if '://' not in str(directory):
    path = path.absolute()
  if read_kind(path) != 'vqkd':
    raise ValueError(f'{path} holds a {read_kind(path)} model, not a VQ-KD tokenizer.')
  config = config if config is not None else load_model_config(path)
  abstract_params, abstract_stats = abstract_variables(config)
  return (_restore(path / PARAMS_DIR, abstract_params, config),
          _restore(path / 'vq_stats', abstract_stats, config), config)


def load_params(directory, config=None, shardings: Any = None):
  """Params of a params checkpoint directory, checked against `config` (default: its own).

  A backbone directory gives the backbone tree; a task model's directory (config.json with a
  "task", see `load_task_params`) gives the task model's tree {'beit3': ..., <head params>}.

  Args:
    directory: a directory written by `save_params`.
    config: the model config the params must fit; default: the directory's config.json.
    shardings: optional tree of `jax.sharding.Sharding` to restore the params already laid out.
  """
  from beit3_jax.models import abstract_params
  path = epath.Path(directory)
  if '://' not in str(directory):
    path = path.absolute()
  if not (path / PARAMS_DIR).exists():
    raise FileNotFoundError(f'{path} is not a params checkpoint: it has no {PARAMS_DIR}/ '
                            '(write one with python -m beit3_jax.convert to-flax).')
  if read_kind(path) != 'beit3':
    raise ValueError(f'{path} holds a {read_kind(path)} model; use load_vqkd.')
  config = config if config is not None else load_model_config(path)
  task, head_sizes = read_task(path)
  if task is None:
    abstract = abstract_params(config, boxed=False)
  else:
    abstract = abstract_task_params(task, config, head_sizes)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return _restore(path / PARAMS_DIR, abstract, config)


def load_task_params(directory, config=None) -> tuple[str | None, Any, Any, dict]:
  """(task, params, model config, head sizes) of a params checkpoint directory.

  task: a name of `heads.TASKS`, or None for a backbone-only directory.
  params: float32 numpy arrays; the task model's tree {'beit3': backbone, <head params>}, and
    for a backbone-only directory {'beit3': backbone} (the same place for the backbone).
  head sizes: {'num_classes': int} / {'num_answers': int} / {} (see `HEAD_SIZE_NAMES`).
  """
  path = epath.Path(directory)
  if '://' not in str(directory):
    path = path.absolute()
  config = config if config is not None else load_model_config(path)
  params = load_params(path, config)
  task, head_sizes = read_task(path)
  return task, (params if task is not None else {'beit3': params}), config, head_sizes


def find_step_dir(path) -> epath.Path | None:
  """The checkpoint step directory of a training workdir (its newest step), of its
  `checkpoints/` dir, or of a step dir itself; None if there is none."""
  path = epath.Path(path)
  if '://' not in str(path):
    path = path.absolute()  # Orbax reads no metadata through a relative path
  if (path / 'state').exists():
    return path
  root = path / 'checkpoints' if (path / 'checkpoints').exists() else path
  if not root.exists():
    return None
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / 'state').exists()]
  return root / str(max(steps)) if steps else None


def is_training_checkpoint(path) -> bool:
  return find_step_dir(path) is not None


def load_training_params(path, item: str = 'params') -> tuple[Any, epath.Path]:
  """(one item of the state as numpy arrays, step dir) of a training run's newest checkpoint
  (or of a step dir). `item`: 'params' (default) or 'extra' (e.g. a tokenizer's vq_stats).

  Only that item is read (not the optimizer state), whatever the mesh that wrote it.
  """
  import orbax.checkpoint as ocp
  step_dir = find_step_dir(path)
  if step_dir is None:
    raise FileNotFoundError(f'{path}: no training checkpoint (checkpoints/<step>/state).')
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(step_dir / 'state').item_metadata.tree
    target = {item: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree[item])}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))
  return restored[item], step_dir


def training_run_dir(step_dir) -> epath.Path:
  """The workdir of a step dir (<workdir>/checkpoints/<step>)."""
  return epath.Path(step_dir).parent.parent


def load_model_config(source):
  """The model config of a config file (.py with get_config()), or of a directory's config.json.

  A run config with a `model` field gives that field; otherwise the file must be a model config.
  """
  from beit3_jax.models.config import config_from_dict
  path = epath.Path(source)
  if str(source).endswith('.py'):
    if not path.exists():
      raise FileNotFoundError(f'No config file at {source}.')
    spec = importlib.util.spec_from_file_location('_beit3_config', str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  else:
    config_file = path / CONFIG_FILE
    if not config_file.exists():
      raise FileNotFoundError(f'{source}: no {CONFIG_FILE} (expected a training workdir or a '
                              'params checkpoint directory, or a .py config file).')
    d = json.loads(config_file.read_text())
  if 'model' in d and isinstance(d['model'], dict):
    d = d['model']
  kind = d.pop('kind', 'beit3')
  d.pop(TASK_FIELD, None)
  d.pop(HEAD_SIZES_FIELD, None)
  try:
    if kind == 'vqkd':
      from beit3_jax.tokenizers import get_vqkd_config
      variant = d.pop('variant', 'base')
      return get_vqkd_config(variant, **d)
    return config_from_dict(d)
  except (KeyError, ValueError) as e:
    raise ValueError(f'{source}: not a valid model config: {e}') from e
