"""The Flax params checkpoint: what `python -m beit3_jax.convert to-flax` writes.

A directory (local or gs://) holding

    config.json    the model config (`beit3_jax.models.get_config(...).to_dict()`); a visual
                   tokenizer's also holds "kind": "vqkd"; a fine-tuned model's (backbone +
                   task head, `convert to-flax --task`) also holds "task" (a name of
                   `beit3_jax.tasks`) and "head_sizes" (e.g. {"num_answers": 3129})
    params/        an Orbax StandardCheckpointer tree of float32 arrays, the Flax param layout
                   (with a task: the task model's tree {'beit3': backbone, <head params>})
    vq_stats/      (visual tokenizers only) the codebook's EMA buffers, another Orbax tree

Training workdirs keep their whole run config in `config.json` with the model config under
`model`; `load_model_config` reads either.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath

from beit3_jax import param_tree
from beit3_jax.defaults import load_config_file
from beit3_jax.models import abstract_params
from beit3_jax.models.config import config_from_dict
from beit3_jax.tokenizers import abstract_variables, get_vqkd_config

CONFIG_FILE = 'config.json'
PARAMS_DIR = 'params'


KINDS = ('beit3', 'vqkd')
# config.json fields of a task model's params directory (not model config fields).
TASK_FIELD = 'task'
HEAD_SIZES_FIELD = 'head_sizes'


def checkpoint_path(path) -> epath.Path:
  """`path` as Orbax needs it: absolute when local (it reads no metadata through a relative
  path), as given when remote (gs://...)."""
  path = epath.Path(path)
  return path if '://' in str(path) else path.absolute()


def save_params(directory, params, config, *, overwrite: bool = False, kind: str = 'beit3',
                extra: dict | None = None, task: str | None = None,
                head_sizes: dict | None = None) -> epath.Path:
  """Writes `params` and `config` as a params checkpoint directory; returns its path.

  Args:
    kind: 'beit3' (the backbone) or 'vqkd' (a visual tokenizer; recorded in config.json).
    extra: other variable collections to save beside params, e.g. {'vq_stats': ...}.
    task: a fine-tuning task's name (`beit3_jax.tasks`): `params` is then that task model's
      whole tree {'beit3': ..., <head params>}, and config.json records the task and
      `head_sizes` (checked by the caller with `Task.check_head_sizes`).
    head_sizes: the task model's sizes, e.g. {'num_classes': int}; {} if it takes none.

  Raises FileExistsError if the directory exists and is not empty, unless `overwrite`.
  """
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; expected one of {KINDS}.')
  if task is not None:
    if kind != 'beit3':
      raise ValueError(f'task={task!r} needs kind beit3, got {kind!r}.')
    head_sizes = {k: int(v) for k, v in (head_sizes or {}).items()}
  import orbax.checkpoint as ocp
  path = checkpoint_path(directory)
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


def stored_shapes(path) -> Any:
  """The tree of jax.ShapeDtypeStruct an Orbax tree at `path` was saved with (nothing read)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(epath.Path(path)).item_metadata.tree
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), tree)


def _restore(path: epath.Path, abstract, config) -> Any:
  """Restores an Orbax tree into `abstract`'s structure, checking every leaf's shape."""
  import orbax.checkpoint as ocp
  # Orbax restores saved numpy arrays at their stored shapes whatever the target says.
  param_tree.check_fits(abstract, stored_shapes(path), f'The arrays in {path}',
                        f'the model config (variant={config.variant})', error=ValueError,
                        verb='do not fit')
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract)


def load_vqkd_params(directory, config=None):
  """(params, vq_stats, config) of a visual tokenizer's params checkpoint directory (written by
  `save_params(..., kind='vqkd')`). For a PyTorch .pth/.safetensors tokenizer file use
  `beit3_jax.tokenizers.load_vqkd_torch`."""
  path = checkpoint_path(directory)
  if read_kind(path) != 'vqkd':
    raise ValueError(f'{path} holds a {read_kind(path)} model, not a VQ-KD tokenizer.')
  config = config if config is not None else load_model_config(path)
  abstract_params, abstract_stats = abstract_variables(config)
  return (_restore(path / PARAMS_DIR, abstract_params, config),
          _restore(path / 'vq_stats', abstract_stats, config), config)


def load_params(directory, config=None, shardings: Any = None):
  """Params of a params checkpoint directory, checked against `config` (default: its own).

  A backbone directory gives the backbone tree; a task model's directory (config.json with a
  "task", see `read_task`) gives the task model's tree {'beit3': ..., <head params>}.

  Args:
    directory: a directory written by `save_params`.
    config: the model config the params must fit; default: the directory's config.json.
    shardings: optional tree of `jax.sharding.Sharding` to restore the params already laid out.
  """
  path = checkpoint_path(directory)
  if not (path / PARAMS_DIR).exists():
    raise FileNotFoundError(f'{path} is not a params checkpoint: it has no {PARAMS_DIR}/ '
                            '(write one with python -m beit3_jax.convert to-flax).')
  if read_kind(path) != 'beit3':
    raise ValueError(f'{path} holds a {read_kind(path)} model; use load_vqkd_params.')
  config = config if config is not None else load_model_config(path)
  if read_task(path)[0] is None:
    abstract = abstract_params(config, boxed=False)
  else:   # a task model: the caller checks the tree against its task (`Task.abstract_params`)
    abstract = stored_shapes(path / PARAMS_DIR)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return _restore(path / PARAMS_DIR, abstract, config)


def find_step_dir(path) -> epath.Path | None:
  """The checkpoint step directory of a training workdir (its newest step), of its
  `checkpoints/` dir, or of a step dir itself; None if there is none."""
  path = checkpoint_path(path)
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
  path = epath.Path(source)
  if str(source).endswith('.py'):
    if not path.exists():
      raise FileNotFoundError(f'No config file at {source}.')
    cfg = load_config_file(str(path))
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
      variant = d.pop('variant', 'base')
      return get_vqkd_config(variant, **d)
    return config_from_dict(d)
  except (KeyError, ValueError) as e:
    raise ValueError(f'{source}: not a valid model config: {e}') from e
