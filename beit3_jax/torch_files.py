"""PyTorch weight files: .safetensors and .pth/.pt/.bin, read and written as numpy arrays.

`.pth` files are read with `torch.load(weights_only=True)`, so no arbitrary objects are
unpickled; torch is imported only for .pth files (the `torch` extra). TorchScript archives
(torch.jit.save, e.g. OpenAI's CLIP releases) are read by `load_torchscript_state_dict` with
`zipfile` and a restricted unpickler, without torch and without running their code.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np

from beit3_jax.data import paths


def as_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The tensors of a checkpoint, unwrapped from a `model` / `module` (unilm) or `state_dict`
  (BEiT v2 tokenizers) key."""
  for wrapper in ('model', 'module', 'state_dict'):
    inner = checkpoint.get(wrapper) if isinstance(checkpoint, Mapping) else None
    if isinstance(inner, Mapping):
      return dict(inner)
  return dict(checkpoint)


_COPY_BUFFER = 16 << 20   # bytes per read when copying a file to or from Cloud Storage


def _load_a_local_copy(path: str, what: str, load):
  """load(a temporary local copy of the remote file `path`), since torch, safetensors and
  zipfile read local files; FileNotFoundError naming `what` when there is no such file."""
  from etils import epath
  source = epath.Path(path)
  if not source.is_file():
    raise FileNotFoundError(f'No {what} at {path}.')
  with tempfile.TemporaryDirectory(prefix='beit3_torch_file_') as tmp:
    local = os.path.join(tmp, source.name)
    with source.open('rb') as src, open(local, 'wb') as dst:
      shutil.copyfileobj(src, dst, _COPY_BUFFER)
    return load(local)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors or .pth/.pt/.bin file as numpy arrays (unwrapped by
  `unwrap_state_dict`). A file at a URL (gs://...) is first copied to a temporary local file,
  since torch and safetensors read local files.

  .pth files are read with `torch.load(weights_only=True)`: no arbitrary objects are unpickled.
  """
  if paths.is_remote(path):
    return _load_a_local_copy(path, 'checkpoint', load_state_dict)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}.')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return load_file(path)
  if path.endswith(('.pth', '.pt', '.bin')):
    torch = _import_torch()
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    return {k: as_numpy(v) for k, v in unwrap_state_dict(checkpoint).items()
            if hasattr(v, 'shape')}
  raise ValueError(f'{path}: expected a .safetensors or .pth/.pt/.bin file.')


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str, *, wrap_model: bool = False,
                    overwrite: bool = False) -> None:
  """Writes tensors to .safetensors or .pth (`wrap_model`: as {'model': ...}, like unilm), at a
  local path or a URL (gs://...: written to a temporary local file, then copied there)."""
  if paths.is_remote(path):
    from etils import epath
    target = epath.Path(path)
    if target.exists() and not overwrite:
      raise FileExistsError(f'{path} exists; pass overwrite=True (--overwrite) to replace it.')
    with tempfile.TemporaryDirectory(prefix='beit3_torch_file_') as tmp:
      local = os.path.join(tmp, target.name)
      save_state_dict(state_dict, local, wrap_model=wrap_model)
      with open(local, 'rb') as src, target.open('wb') as dst:
        shutil.copyfileobj(src, dst, _COPY_BUFFER)
    return
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True (--overwrite) to replace it.')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # (np.ascontiguousarray alone would turn a 0-d tensor, e.g. unilm's logit_scale, into (1,).)
  arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state_dict.items()}
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file
    save_file(arrays, path)
  elif path.endswith(('.pth', '.pt', '.bin')):
    torch = _import_torch()
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    torch.save({'model': tensors} if wrap_model else tensors, path)
  else:
    raise ValueError(f'{path}: expected a .safetensors or .pth/.pt/.bin file name.')


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError('Reading or writing .pth files needs torch: pip install "beit3_jax[torch]"'
                      ' (or use .safetensors).') from e
  return torch


# ----------------------------------------------------------------------------- TorchScript

# torch storage class name -> numpy dtype of its elements (bfloat16 is read as float32).
_STORAGE_DTYPES = {
    'HalfStorage': np.float16, 'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class TorchScriptError(ValueError):
  """A file that is not a TorchScript archive this reader understands (the message says why)."""


class _StorageType:
  """Stands for a `torch.<X>Storage` global of the pickle: only its element dtype is kept."""

  def __init__(self, name: str):
    self.name = name


class _ScriptObject:
  """Stands for a scripted module (`__torch__.<class>`): its attributes end up in `state`."""
  type_name = ''

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2 on a numpy storage: the strided view, copied."""
  del unused
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return np.array(storage[offset])
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _identity(value, *unused):
  del unused
  return value


def _read_torchscript_pickle(archive, prefix: str, record: str, path: str):
  """Unpickles `<prefix>/<record>` of a TorchScript zip without running any of its code.

  Only the globals a TorchScript pickle of weights uses are resolved (tensor rebuilding,
  storage types, OrderedDict, torch.jit._pickle's list builders); a scripted module's class
  `__torch__.<name>` becomes a plain record of its attributes. Any other global is refused.
  """
  big_endian = False
  if f'{prefix}/byteorder' in archive.namelist():
    big_endian = archive.read(f'{prefix}/byteorder').strip() == b'big'
  storages: dict[str, np.ndarray] = {}

  def storage_array(kind: _StorageType, key: str) -> np.ndarray:
    if key not in storages:
      name = f'{prefix}/data/{key}'
      if name not in archive.namelist():
        raise TorchScriptError(f'{path}: tensor data {name} is missing from the archive.')
      dtype = _STORAGE_DTYPES[kind.name]
      if dtype == 'bfloat16':
        raw = np.frombuffer(archive.read(name), '>u2' if big_endian else '<u2')
        storages[key] = (raw.astype(np.uint32) << 16).view(np.float32)
      else:
        dtype = np.dtype(dtype).newbyteorder('>' if big_endian else '<')
        storages[key] = np.frombuffer(archive.read(name), dtype).astype(dtype.newbyteorder('='))
    return storages[key]

  allowed = {
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _identity,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch.jit._pickle', 'build_intlist'): _identity,
      ('torch.jit._pickle', 'build_doublelist'): _identity,
      ('torch.jit._pickle', 'build_boollist'): _identity,
      ('torch.jit._pickle', 'build_tensorlist'): _identity,
      ('torch.jit._pickle', 'restore_type_tag'): _identity,
  }

  class Unpickler(pickle.Unpickler):

    def find_class(self, module, name):
      if (module, name) in allowed:
        return allowed[(module, name)]
      if module == 'torch' and name in _STORAGE_DTYPES:
        return _StorageType(name)
      if module.startswith('__torch__'):
        return type(name, (_ScriptObject,), {'type_name': f'{module}.{name}'})
      raise TorchScriptError(f'{path}: {record} needs {module}.{name}, which a TorchScript '
                             'archive of weights does not use; not reading it.')

    def persistent_load(self, pid):
      if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == 'storage'
              and isinstance(pid[1], _StorageType)):
        raise TorchScriptError(f'{path}: {record} refers to {pid!r}, not a tensor storage.')
      return storage_array(pid[1], str(pid[2]))

  return Unpickler(io.BytesIO(archive.read(f'{prefix}/{record}'))).load()


def _torchscript_prefix(archive, path: str) -> str:
  """The folder of an archive's records (`<name>/data.pkl`); raises if it has no code/."""
  names = archive.namelist()
  pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise TorchScriptError(f'{path}: a TorchScript archive has one <name>/data.pkl; found '
                           f'{pickles or "none"}.')
  prefix = pickles[0].split('/')[0]
  if not any(n.startswith(f'{prefix}/code/') for n in names):
    raise TorchScriptError(f'{path}: no {prefix}/code/ in the zip: a torch.save file, not a '
                           'TorchScript archive (read it with load_state_dict).')
  return prefix


def is_torchscript_archive(path: str) -> bool:
  """Whether a local file is a TorchScript archive (torch.jit.save: a zip with code/)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    try:
      _torchscript_prefix(archive, path)
    except TorchScriptError:
      return False
  return True


def _flatten_script_object(value, prefix: str, out: dict[str, np.ndarray]) -> None:
  if isinstance(value, _ScriptObject):
    for name, attr in getattr(value, 'state', {}).items():
      _flatten_script_object(attr, f'{prefix}{name}.', out)
  elif isinstance(value, np.ndarray):
    out[prefix[:-1]] = value


def load_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a TorchScript archive (e.g. OpenAI's CLIP `ViT-B-16.pt`) as numpy arrays,
  keyed as the module's `state_dict()` would be (`visual.conv1.weight`, ...).

  The archive is read as a zip with `zipfile`; its `data.pkl` (the pickled module) is unpickled
  by a restricted unpickler that builds no torch object and runs none of the archive's code,
  and the tensors are read from `<name>/data/<key>`. torch is not needed. Every tensor-valued
  attribute of the module tree is returned: parameters and buffers, and also the rare plain
  tensor attributes (e.g. a registered attention mask). bfloat16 tensors come back as float32,
  others in their stored dtype (OpenAI's CLIP archives: float16).

  A remote path (gs://...) is first copied to a temporary local file.

  Raises:
    FileNotFoundError: no file at `path`.
    TorchScriptError: not a TorchScript archive, or its pickle needs something besides tensors
      and scripted-module records.
  """
  if paths.is_remote(path):
    return _load_a_local_copy(path, 'TorchScript archive', load_torchscript_state_dict)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No TorchScript archive at {path}.')
  if not zipfile.is_zipfile(path):
    raise TorchScriptError(f'{path} is not a zip file, so not a TorchScript archive.')
  with zipfile.ZipFile(path) as archive:
    prefix = _torchscript_prefix(archive, path)
    root = _read_torchscript_pickle(archive, prefix, 'data.pkl', path)
  if not isinstance(root, _ScriptObject):
    raise TorchScriptError(f'{path}: data.pkl holds a {type(root).__name__}, not a module.')
  out: dict[str, np.ndarray] = {}
  _flatten_script_object(root, '', out)
  return out
