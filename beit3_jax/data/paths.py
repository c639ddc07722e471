"""Where built data lives: the default data dir, overridable by env var and by config.

    $BEIT3_JAX_DATA_DIR            (default ~/.cache/beit3_jax)
      tfds/                        TFDS data dir of the built-in and local builders
      spm/                         SentencePiece models trained by the project (the demo's .spm)
      tokenizers/                  visual tokenizers trained by the project (the demo's VQ-KD)

A config's `data_dir` field, when set, wins over the environment variable. It may be a URL
such as gs://bucket/data (TPU pods): the data sets a job reads from there are copied to a local
folder first (`remote_cache_dir`, see `tfds_sources.open_source`), because ArrayRecord reads
each record with its own request from remote storage:

    $BEIT3_JAX_REMOTE_DATA_CACHE   (default <the local default data dir>/remote_cache;
      <scheme>/<bucket>/<path>/     'off': read the remote files in place)
"""

from __future__ import annotations

import os

ENV_VAR = 'BEIT3_JAX_DATA_DIR'
REMOTE_CACHE_ENV_VAR = 'BEIT3_JAX_REMOTE_DATA_CACHE'
REMOTE_CACHE_OFF = 'off'
_LOCAL_DEFAULT = os.path.join('~', '.cache', 'beit3_jax')


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://..., s3://...) rather than a local path."""
  return '://' in str(path)


def default_data_dir() -> str:
  """$BEIT3_JAX_DATA_DIR (a local path, made absolute, or a URL), or ~/.cache/beit3_jax."""
  value = os.environ.get(ENV_VAR)
  if value and is_remote(value):
    return value.rstrip('/')
  return os.path.abspath(os.path.expanduser(value or _LOCAL_DEFAULT))


def remote_cache_dir() -> str | None:
  """The local folder that holds copies of remote data sets: $BEIT3_JAX_REMOTE_DATA_CACHE, or
  `remote_cache` under the default data dir (under ~/.cache/beit3_jax when that is remote);
  None when the variable is 'off' (remote files are then read in place)."""
  value = os.environ.get(REMOTE_CACHE_ENV_VAR, '').strip()
  if value.lower() == REMOTE_CACHE_OFF:
    return None
  if value:
    if is_remote(value):
      raise ValueError(f'${REMOTE_CACHE_ENV_VAR}={value}: must be a local folder (or '
                       f'{REMOTE_CACHE_OFF!r} to read remote data sets in place).')
    return os.path.abspath(os.path.expanduser(value))
  root = default_data_dir()
  if is_remote(root):
    root = os.path.abspath(os.path.expanduser(_LOCAL_DEFAULT))
  return os.path.join(root, 'remote_cache')


def remote_cache_path(url: str, cache_dir: str) -> str:
  """Where the local copy of `url` (scheme://bucket/path) lives under `cache_dir`:
  <cache_dir>/<scheme>/<bucket>/<path>."""
  scheme, rest = str(url).split('://', 1)
  parts = [p for p in rest.split('/') if p]
  if not parts or any(p in ('.', '..') for p in parts):
    raise ValueError(f'{url}: expected scheme://bucket/path.')
  return os.path.join(cache_dir, scheme, *parts)


def resolve_data_dir(data_dir: str | None = None) -> str:
  """`data_dir` if given (e.g. from a config), else `default_data_dir()`.

  A URL such as gs://bucket/data (TPU pods) is kept as it is; a local path is made absolute.
  """
  if data_dir and is_remote(data_dir):
    return str(data_dir).rstrip('/')
  return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


def join(root: str, name: str) -> str:
  """`root`/`name` for a local path or a URL."""
  return f'{root}/{name}' if is_remote(root) else os.path.join(root, name)


def tfds_dir(data_dir: str | None = None) -> str:
  return join(resolve_data_dir(data_dir), 'tfds')


def spm_dir(data_dir: str | None = None) -> str:
  return join(resolve_data_dir(data_dir), 'spm')


def tokenizers_dir(data_dir: str | None = None) -> str:
  """Where trained visual tokenizers of the built-in data (the demo's) are kept."""
  return join(resolve_data_dir(data_dir), 'tokenizers')


class StorageUnreachable(OSError):
  """A remote path (gs://...) could not be reached; the message names it and what to check."""


_STORAGE_CLIENT_MODULES = ('aiohttp', 'gcsfs', 'google', 'fsspec', 'tensorstore')
_STORAGE_MESSAGES = ('Error reading', 'Error writing', 'UNAVAILABLE', 'DEADLINE_EXCEEDED')


def is_storage_error(error: BaseException) -> bool:
  """Whether `error` (or an error it was raised from) is a failure to reach remote storage:
  a connection, HTTP or OS error of gcsfs / aiohttp / google-auth / tensorstore."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = str(error)
    if (isinstance(error, (ConnectionError, TimeoutError))
        or type(error).__module__.split('.')[0] in _STORAGE_CLIENT_MODULES
        or ('://' in text and any(m in text for m in _STORAGE_MESSAGES))):
      return True
    error = error.__cause__ or error.__context__
  return False


def check_reachable(named_paths: dict[str, str]) -> None:
  """Looks up each remote path of `named_paths` ({what: path}; local ones are skipped) once,
  so that a run whose storage cannot be reached stops before it builds anything.

  Raises:
    StorageUnreachable: naming the first path that failed and the error (gcsfs retries a
      failed request for about half a minute before that).
  """
  import logging
  from etils import epath
  gcsfs_log = logging.getLogger('gcsfs')
  level = gcsfs_log.level
  for what, path in named_paths.items():
    if not is_remote(path):
      continue
    gcsfs_log.setLevel(logging.CRITICAL)   # it logs each failed retry with a traceback
    try:
      epath.Path(path).exists()
    except Exception as e:   # aiohttp, google-auth and HTTP errors alike
      reason = (str(e).strip().splitlines() or [''])[0]
      raise StorageUnreachable(
          f'{what}={path}: cannot reach it ({type(e).__name__}: {reason}). Check the network, '
          'the bucket name and the credentials (on a TPU VM, its service account needs access '
          'to the bucket).') from None
    finally:
      gcsfs_log.setLevel(level)
