"""A local Cloud Storage server for tests: gs:// paths without a cloud project or credentials.

The server is gcp-storage-emulator (the `test` extra), in memory, on a free port, with one
bucket. The `gcs` fixture (session-scoped) points the test process at it and returns a
`LocalGcs` with the bucket's URL and an environment for subprocesses:

    STORAGE_EMULATOR_HOST=http://localhost:PORT            gcsfs (etils.epath, TFDS, Orbax's
                                                           metadata files)
    TENSORSTORE_GCS_HTTP_URL=http://localhost:PORT         tensorstore (Orbax's arrays)
    CLOUD_STORAGE_EMULATOR_ENDPOINT=http://localhost:PORT  ArrayRecord's own GCS client
    FSSPEC_GS_TOKEN=anon                                   gcsfs: no credential lookup
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false                gcsfs: its plain JSON-API client
                                                           (the emulator has no storage-control
                                                           API to ask a bucket's type)
    GCE_METADATA_HOST, _ROOT, _IP, NO_GCE_CHECK            no probe of a GCE metadata server

Use it from a test module with `from gcs_server import gcs  # noqa: F401` (tests/ is on
sys.path, see conftest.py). `python tests/gcs_server.py` serves until Ctrl-C (see `main`).

`patch_emulator` adds what real Cloud Storage does and the emulator does not, which
tensorstore's OCDBT driver (the format of Orbax checkpoints) and ArrayRecord rely on:

  * reads answer with the object's `x-goog-generation` (and metageneration) header; without it
    tensorstore records generation 0 for the object it read;
  * reads honour `ifGenerationNotMatch` (304 Not Modified) and `ifGenerationMatch` (412);
    without them a revalidation of a cached `manifest.ocdbt` gets a 200 without a generation;
  * simple and multipart uploads, and deletes, honour `ifGenerationMatch` (412 Precondition
    Failed; 0 = only if the object does not exist), OCDBT's compare-and-swap of its manifest;
  * suffix byte ranges (`Range: bytes=-N`, the last N bytes), which ArrayRecord's client reads
    a file's tail with; the emulator answers them with the whole file.

Without the patch, an Orbax save of a few hundred arrays (any TrainState: params, adam's mu and
nu) fails in most runs with `Error reading "<array>/.zarray" in OCDBT database at gs://...:
Error reading gs://.../manifest.ocdbt: Malformed StorageGeneration` (generation 0 is refused
as a condition).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import socketserver
from http import HTTPStatus

import pytest

BUCKET = 'beit3-test'    # GCS bucket names need 3-63 characters

_ENV_NAMES = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
              'CLOUD_STORAGE_EMULATOR_ENDPOINT', 'FSSPEC_GS_TOKEN',
              'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'GCE_METADATA_HOST', 'GCE_METADATA_ROOT',
              'GCE_METADATA_IP', 'NO_GCE_CHECK')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _generation(storage, request) -> str | None:
  """The stored generation of the request's object, None if it does not exist."""
  from gcp_storage_emulator.exceptions import NotFound
  bucket = request.params['bucket_name']
  name = request.params.get('object_id') or (request.query.get('name') or [None])[0]
  if name is None and request.method in ('POST', 'PUT') and isinstance(request.data, dict):
    name = (request.data.get('meta') or {}).get('name') or request.data.get('name')  # multipart
  if name is None:
    return None
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return None


def _query(request, key: str) -> str | None:
  values = request.query.get(key)
  return values[0] if values else None


def _read_precondition(request, storage) -> HTTPStatus | None:
  """The status real GCS answers a GET with when its generation preconditions fail."""
  current = _generation(storage, request)
  if current is None:
    return None   # the handler answers 404
  match, not_match = _query(request, 'ifGenerationMatch'), _query(request, 'ifGenerationNotMatch')
  if match is not None and match != current:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match is not None and not_match == current:
    return HTTPStatus.NOT_MODIFIED
  return None


def _write_precondition(request, storage) -> HTTPStatus | None:
  """412 when an upload's or delete's ifGenerationMatch does not hold (0: must not exist)."""
  match = _query(request, 'ifGenerationMatch')
  if match is None:
    return None
  current = _generation(storage, request)
  if (match == '0' and current is not None) or (match != '0' and match != current):
    return HTTPStatus.PRECONDITION_FAILED
  return None


def _suffix_range_to_absolute(request, storage) -> None:
  """Rewrites a suffix range `bytes=-N` (the last N bytes, which real GCS serves and the
  emulator reads as no range) to `bytes=max(0, size-N)-`."""
  headers = request._request_handler.headers
  value = headers.get('range')
  match = re.fullmatch(r'\s*bytes=-(\d+)\s*', value or '')
  if not match:
    return
  from gcp_storage_emulator.exceptions import NotFound
  try:
    size = len(storage.get_file(request.params['bucket_name'], request.params['object_id']))
  except NotFound:
    return
  del headers['range']
  headers['Range'] = f'bytes={max(0, size - int(match[1]))}-'


def _with_generation_headers(handler):
  """A GET handler that checks preconditions and sends x-goog-generation like real GCS."""

  def get(request, response, storage, *args, **kwargs):
    failed = _read_precondition(request, storage)
    if failed is not None:
      response.status = failed
      return None
    _suffix_range_to_absolute(request, storage)
    result = handler(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      from gcp_storage_emulator.exceptions import NotFound
      try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      except NotFound:
        return result
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
      if obj.get('size') is not None:
        response['x-goog-stored-content-length'] = str(obj['size'])
    return result

  return get


def _with_write_precondition(handler):
  """An upload / delete handler that honours ifGenerationMatch like real GCS."""

  def write(request, response, storage, *args, **kwargs):
    if request.method in ('POST', 'PUT'):
      request.data  # noqa: B018 -- read the body first, so that a 412 closes cleanly
    failed = _write_precondition(request, storage)
    if failed is not None:
      response.status = failed
      response.json({'error': {'code': failed.value, 'message': 'Precondition Failed'}})
      return None
    return handler(request, response, storage, *args, **kwargs)

  return write


def patch_emulator() -> None:
  """Adds generation headers and preconditions to the emulator's object routes (idempotent)."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  if getattr(server, '_beit3_patched', False):
    return
  wrap = {objects.get: _with_generation_headers(objects.get),
          objects.download: _with_generation_headers(objects.download),
          objects.insert: _with_write_precondition(objects.insert),
          objects.delete: _with_write_precondition(objects.delete)}
  server.HANDLERS = tuple((regex, {method: wrap.get(fn, fn) for method, fn in routes.items()})
                          for regex, routes in server.HANDLERS)
  server._beit3_patched = True


class _QuietHTTPServer(socketserver.TCPServer):
  """One request at a time (so that a precondition check and its write are atomic, as on
  GCS), without tracebacks for clients that hang up early (tensorstore cancels reads)."""

  allow_reuse_address = True
  outage_after = None   # a regex: once a request's path matches it, every request is dropped
  in_outage = False

  def verify_request(self, request, client_address):
    if self.in_outage:
      return False   # the connection is closed unanswered, as by a network that is down
    if self.outage_after is not None:
      try:
        line = request.recv(8192, socket.MSG_PEEK).split(b'\r\n', 1)[0].decode('latin-1')
      except OSError:
        return True
      if re.search(self.outage_after, line):
        self.in_outage = True
        return False
    return True

  def handle_error(self, request, client_address):
    import sys
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


@dataclasses.dataclass
class LocalGcs:
  """A running local server. `url`: gs://<bucket>; `env`: os.environ plus its variables (for
  subprocesses); `endpoint`: http://localhost:PORT."""
  url: str
  env: dict
  endpoint: str
  server: object = dataclasses.field(repr=False)

  def path(self, *parts: str) -> str:
    """gs://<bucket>/<parts...>."""
    return '/'.join([self.url, *parts])

  def stop(self) -> None:
    self.server.stop()

  def outage(self, after: str | None) -> None:
    """From the first request whose request line (method, path and query; an object's name is
    URL-quoted there) matches the regex `after` on, every request is dropped unanswered;
    `outage(None)` ends it."""
    httpd = self.server._api._httpd
    httpd.outage_after, httpd.in_outage = after, False


def start(bucket: str = BUCKET) -> LocalGcs:
  """Starts the patched emulator in this process (a thread) with `bucket`; returns its handle
  (the environment variables are not set here: see `environment`)."""
  from functools import partial

  from gcp_storage_emulator import server as emulator
  patch_emulator()
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  port = _free_port()
  srv = emulator.create_server('localhost', port, in_memory=True, default_bucket=bucket)

  def run(thread=srv._api):
    thread._httpd = _QuietHTTPServer(
        (thread._host, thread._port), partial(emulator.RequestHandler, thread._storage))
    thread.is_running.set()
    thread._httpd.serve_forever(poll_interval=0.05)

  srv._api.run = run
  srv.start()
  endpoint = f'http://localhost:{port}'
  return LocalGcs(f'gs://{bucket}', {**os.environ, **environment(endpoint)}, endpoint, srv)


def environment(endpoint: str) -> dict:
  """The variables that point gcsfs and tensorstore at `endpoint`, without credentials."""
  unreachable = f'localhost:{_free_port()}'   # no GCE metadata server: fail fast, not time out
  return {'STORAGE_EMULATOR_HOST': endpoint, 'TENSORSTORE_GCS_HTTP_URL': endpoint,
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': endpoint,
          'FSSPEC_GS_TOKEN': 'anon', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
          'GCE_METADATA_HOST': unreachable, 'GCE_METADATA_ROOT': unreachable,
          'GCE_METADATA_IP': unreachable, 'NO_GCE_CHECK': 'true'}


def _reset_gs_clients(plain: bool = True) -> None:
  """Drops cached gcsfs clients, so that the next gs:// access reads the environment anew;
  `plain`: gs:// goes to gcsfs's plain JSON-API client (its default, the experimental
  `ExtendedGcsFileSystem` chosen when gcsfs was imported without
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, asks a storage-control API the emulator lacks, and
  retries that for 60 s on every call)."""
  import fsspec
  if plain:
    fsspec.config.conf.setdefault('gs', {})['token'] = 'anon'
    try:
      import gcsfs.core
      fsspec.register_implementation('gs', gcsfs.core.GCSFileSystem, clobber=True)
      fsspec.register_implementation('gcs', gcsfs.core.GCSFileSystem, clobber=True)
    except ImportError:
      pass
  else:
    fsspec.config.conf.get('gs', {}).pop('token', None)
    try:
      import gcsfs
      fsspec.register_implementation('gs', gcsfs.GCSFileSystem, clobber=True)
      fsspec.register_implementation('gcs', gcsfs.GCSFileSystem, clobber=True)
    except ImportError:
      pass
  try:
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
  except (ImportError, AttributeError):
    pass
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass


@pytest.fixture(scope='session')
def gcs():
  """A local Cloud Storage server for the session; this process's gs:// paths go to it."""
  saved = {k: os.environ.get(k) for k in _ENV_NAMES}
  local = start()
  os.environ.update({k: local.env[k] for k in _ENV_NAMES})   # before gcsfs is imported
  import gcsfs  # noqa: F401  (an install requirement; imported after the variables are set)
  _reset_gs_clients()
  try:
    yield local
  finally:
    local.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _reset_gs_clients(plain=False)


def main() -> None:
  """`python tests/gcs_server.py`: runs the server until Ctrl-C and prints its variables, to
  try a command against it by hand, e.g. the demo with --workdir=gs://beit3-test/run."""
  import time
  local = start()
  names = [k for k in _ENV_NAMES if k in local.env]
  print(' '.join(f'{k}={local.env[k]}' for k in names), flush=True)
  print(f'Serving {local.url} at {local.endpoint} (in memory) until Ctrl-C.', flush=True)
  try:
    while True:
      time.sleep(1)
  except KeyboardInterrupt:
    local.stop()


if __name__ == '__main__':
  main()
