"""Where built data lives: the default data dir, overridable by env var and by config.

    $BEIT3_JAX_DATA_DIR            (default ~/.cache/beit3_jax)
      tfds/                        TFDS data dir of the built-in and local builders
      spm/                         SentencePiece models trained by the project (the demo's .spm)
      tokenizers/                  visual tokenizers trained by the project (the demo's VQ-KD)

A config's `data_dir` field, when set, wins over the environment variable.
"""

from __future__ import annotations

import os

ENV_VAR = 'BEIT3_JAX_DATA_DIR'


def default_data_dir() -> str:
  """$BEIT3_JAX_DATA_DIR, or ~/.cache/beit3_jax."""
  return os.path.abspath(os.path.expanduser(
      os.environ.get(ENV_VAR) or os.path.join('~', '.cache', 'beit3_jax')))


def resolve_data_dir(data_dir: str | None = None) -> str:
  """`data_dir` if given (e.g. from a config), else `default_data_dir()`.

  A URL such as gs://bucket/data (TPU pods) is kept as it is; a local path is made absolute.
  """
  if data_dir and '://' in str(data_dir):
    return str(data_dir).rstrip('/')
  return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


def _join(root: str, name: str) -> str:
  return f'{root}/{name}' if '://' in root else os.path.join(root, name)


def tfds_dir(data_dir: str | None = None) -> str:
  return _join(resolve_data_dir(data_dir), 'tfds')


def spm_dir(data_dir: str | None = None) -> str:
  return _join(resolve_data_dir(data_dir), 'spm')


def tokenizers_dir(data_dir: str | None = None) -> str:
  """Where trained visual tokenizers of the built-in data (the demo's) are kept."""
  return _join(resolve_data_dir(data_dir), 'tokenizers')
