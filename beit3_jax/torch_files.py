"""PyTorch weight files: .safetensors and .pth/.pt/.bin, read and written as numpy arrays.

`.pth` files are read with `torch.load(weights_only=True)`, so no arbitrary objects are
unpickled; torch is imported only for .pth files (the `torch` extra).
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors or .pth/.pt/.bin file as numpy arrays (unwrapped by
  `unwrap_state_dict`). A file at a URL (gs://...) is first copied to a temporary local file,
  since torch and safetensors read local files.

  .pth files are read with `torch.load(weights_only=True)`: no arbitrary objects are unpickled.
  """
  if paths.is_remote(path):
    from etils import epath
    source = epath.Path(path)
    if not source.is_file():
      raise FileNotFoundError(f'No checkpoint at {path}.')
    with tempfile.TemporaryDirectory(prefix='beit3_torch_file_') as tmp:
      local = os.path.join(tmp, source.name)
      with source.open('rb') as src, open(local, 'wb') as dst:
        shutil.copyfileobj(src, dst, _COPY_BUFFER)
      return load_state_dict(local)
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
