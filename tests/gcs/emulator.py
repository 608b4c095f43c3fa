r"""The Google Cloud Storage server of the tests: gcp-storage-emulator, its defects fixed here.

Run as a program (tests/gcs_world.py starts it); it serves one data directory over HTTP on
127.0.0.1:<port> and on a Unix socket (the way in from the network namespace of the jobs).
Only the server is changed: TensorFlow's GCS client, tensorstore and Orbax talk to it
unmodified, as they would to storage.googleapis.com. Every fix below is made here, by
wrapping or replacing the emulator's handlers, and names the request that needs it:

 1. An empty request body is None and `len(None)` raises: the connection drops without an
    answer, and the client retries for minutes. `POST /upload/storage/v1/b/B/o?uploadType=
    media&name=dir/&ifGenerationMatch=0` with no body is how TF's `gfile.makedirs` writes a
    directory marker (so also `tf.summary.create_file_writer` and Orbax's first save), and
    tensorstore writes an empty value the same way. An empty body is b'' here.
 2. A body sent with `Transfer-Encoding: chunked` and a `Content-Length` header is read by
    its Content-Length, so the chunk framing is stored as data and the body cut short: TF's
    curl sends every resumable-upload PUT this way, and `GFile.write('hello')` stored
    '5\r\nhe' (a TFRecord file read back: DataLossError). Transfer-Encoding wins, as RFC 9112
    section 6.3 says, and the chunks are decoded.
 3. A body cut short (the client died or the connection dropped mid-upload) was stored as
    if it were whole. Now nothing is stored and the connection is closed unanswered, as a
    real server that lost the request would.
 4. HTTP/1.0 and one thread: TF's curl sends `Expect: 100-continue` with every upload, even
    an empty one, and, unanswered, waits 1 s before sending the body (each TF write took
    1.1 s); one slow connection held every other client. The server speaks HTTP/1.1
    (100 Continue, keep-alive) with a thread per connection; one lock keeps the storage
    calls serial, and every body is read whole before its handler runs, so a handler that
    ignores its body (objects.rewrite: TF's `gfile.rename`) leaves nothing behind on a
    kept-alive connection.
 5. Objects are stored as files named by their object names, so `dir/` (a directory marker,
    made by `gfile.makedirs`) and `dir/file`, or `a` and `a/b`, are one path on disk: the
    second write fails. The content of an object is kept in a file named by the quoted
    object name instead.
 6. The state file (.meta) and object files were rewritten in place: a server killed
    mid-write (the tests' outage drills SIGKILL it) left a truncated .meta and would not
    start again. Files are written to a temporary name and renamed.
 7. The generation of an object was taken when its resource was built (for a resumable
    upload: when the session started), not when the data was committed, so it was not the
    commit order. Every commit now gets a new, strictly increasing generation.
 8. Preconditions were ignored: ifGenerationMatch / ifGenerationNotMatch /
    ifMetagenerationMatch / ifMetagenerationNotMatch (and ifSource* on copy and rewrite).
    tensorstore writes with `ifGenerationMatch` (0: only if absent; Orbax's OCDBT manifest
    is written so) and reads with `ifGenerationNotMatch` (304 when its cache is current): a
    tensorstore write conditioned on a stale generation overwrote the newer value. A failed
    condition answers 412 (writes) or 304 (reads), as GCS does.
 9. Media downloads carried no x-goog-generation header, from which tensorstore takes an
    object's generation: Orbax's OCDBT failed with 'Error reading gs://.../manifest.ocdbt:
    Malformed StorageGeneration'. Ranged downloads had no x-goog-hash, and ranges were half
    done: a suffix range (`Range: bytes=-N`, tensorstore's `byte_range=slice(-N, None)`)
    returned the whole object with 200 (tensorstore: 'Requested byte range [-N, ?) was
    ignored by server'), a range past the end a 206 with an empty body; GCS answers 206 with
    the last N bytes, and 416. Reading a `generation=` that is not the current one answered
    with the current data (404 now: no other generation is kept).
10. The status query of a resumable upload (`PUT <session>` with `Content-Range: bytes */N`,
    which TF sends after an interrupted upload) answered `Range: bytes=0-0` when no byte had
    been received, claiming one byte: the client would resume at offset 1 and drop the
    first byte. No Range header is sent when nothing was received.
11. Listing ignored maxResults, pageToken, startOffset, endOffset and
    includeTrailingDelimiter (tensorstore lists key ranges with startOffset/endOffset).
12. DELETE answered 200 with an empty body instead of 204, HEAD was not implemented (501),
    and a handler that raised dropped the connection without an answer (a client retried
    its request forever); it answers 500 with the error now, and the traceback is logged.
"""
import argparse
import datetime
import hashlib
import logging
import os
import re
import socketserver
import sys
import threading
import time
import traceback
import urllib.parse
from http import HTTPStatus, server as http_server

from gcp_storage_emulator import server as gse
from gcp_storage_emulator import storage as gse_storage
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects

log = logging.getLogger('gcs_emulator')

# The emulator's storage is plain dicts written to one .meta file: one request at a time.
_LOCK = threading.Lock()


# ------------------------------------------------------------------ storage (fixes 5, 6, 7)
def _atomic_write_bytes(self, rel: str, content: bytes) -> None:
  """_FileStore.write_bytes by a temporary file and a rename (fix 6)."""
  rel = self._norm(rel)
  if self._use_memory:
    return _ORIGINAL_WRITE_BYTES(self, rel, content)
  path = self._disk_path(rel)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.{threading.get_ident()}.tmp')
  tmp.write_bytes(content)
  os.replace(tmp, path)


_ORIGINAL_WRITE_BYTES = gse_storage._FileStore.write_bytes
gse_storage._FileStore.write_bytes = _atomic_write_bytes


class Storage(gse_storage.Storage):
  """The emulator's storage, with one flat file per object and commit-time generations."""

  _last_generation = 0

  def _object_path(self, bucket_name, file_name):
    # Fix 5: one file per object, never a directory shared with other names. Quoted names
    # never contain '#', so the hashed form of a name too long for a file name is distinct.
    quoted = urllib.parse.quote(file_name, safe='')
    if len(quoted) > 200:
      quoted = '#' + hashlib.sha256(file_name.encode()).hexdigest()
    return f'{bucket_name}/{quoted}'

  def next_generation(self) -> int:
    # Strictly increasing across restarts too: the clock, or one more than the last.
    Storage._last_generation = max(time.time_ns() // 1000, Storage._last_generation + 1)
    return Storage._last_generation

  def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
    # Fix 7: the generation is the commit's. The handlers answer with this same dict.
    generation = self.next_generation()
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')
    file_obj.update({
        'generation': str(generation), 'metageneration': '1',
        'id': f'{bucket_name}/{file_name}/{generation}', 'size': str(len(content)),
        'timeCreated': now, 'updated': now,
    })
    link = file_obj.get('mediaLink')
    if isinstance(link, str):
      file_obj['mediaLink'] = link.split('?')[0] + f'?generation={generation}&alt=media'
    return super().create_file(bucket_name, file_name, content, file_obj, file_id)


# ------------------------------------------------------------------ request bodies (1, 2, 3)
class TruncatedBody(Exception):
  """The connection ended before the body announced by the request's headers."""


def read_body(rfile, headers) -> bytes:
  """The whole request body, de-chunked; b'' when there is none (fixes 1-3)."""
  codings = [c.strip().lower() for c in headers.get('Transfer-Encoding', '').split(',')
             if c.strip()]
  if codings and codings[-1] == 'chunked':
    parts = []
    while True:
      line = rfile.readline(65537)
      if not line.endswith(b'\n'):
        raise TruncatedBody()
      size = int(line.split(b';', 1)[0].strip(), 16)
      if size == 0:
        while True:  # Trailer fields, up to the blank line.
          line = rfile.readline(65537)
          if not line.endswith(b'\n'):
            raise TruncatedBody()
          if not line.strip():
            break
        break
      chunk = rfile.read(size)
      if len(chunk) < size or rfile.readline(3).strip():
        raise TruncatedBody()
      parts.append(chunk)
    raw = b''.join(parts)
  else:
    length = int(headers.get('Content-Length') or 0)
    raw = rfile.read(length) if length else b''
    if len(raw) < length:
      raise TruncatedBody()
  return raw  # Content-Encoding is the emulator's parser's business (Request.data).


class Request(gse.Request):
  """gse.Request on a body read beforehand: the emulator's parsing, b'' for no body."""

  def __init__(self, request_handler, method, body: bytes):
    super().__init__(request_handler, method)
    self._body = body
    self._match = None

  @property
  def data(self):
    if self._data is gse._UNSET:
      if not self._body:
        self._data = b''
      else:
        # The emulator's own parser (JSON, multipart), on the body already read.
        original = gse._read_raw_data
        gse._read_raw_data = lambda _: self._body
        try:
          self._data = gse._read_data(self._request_handler, self._query)
        finally:
          gse._read_raw_data = original
    return self._data


# ------------------------------------------------------------------ preconditions (fix 8)
def _first(request, key):
  values = request.query.get(key)
  return values[0] if values else None


def _error(response, status: HTTPStatus, message: str, reason: str) -> None:
  response.status = status
  response.json({'error': {'code': status.value, 'message': message,
                           'errors': [{'domain': 'global', 'reason': reason,
                                       'message': message}]}})


def _live(storage, bucket, name):
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def check_preconditions(request, response, obj, read: bool, source: bool = False) -> bool:
  """False, with the answer set (412, or 304 for a read), when a condition fails.

  `obj`: the object's current resource, None when it does not exist (generation 0).
  `source`: the ifSource* conditions of a copy or rewrite instead.
  """
  generation = int(obj['generation']) if obj else 0
  metageneration = int(obj['metageneration']) if obj else None
  p = lambda name: _first(request, 'ifSource' + name[2:] if source else name)  # noqa: E731
  failed = not_modified = False
  if p('ifGenerationMatch') is not None and int(p('ifGenerationMatch')) != generation:
    failed = True
  if p('ifMetagenerationMatch') is not None and (
      metageneration is None or int(p('ifMetagenerationMatch')) != metageneration):
    failed = True
  if p('ifGenerationNotMatch') is not None and int(p('ifGenerationNotMatch')) == generation:
    not_modified = True
  if p('ifMetagenerationNotMatch') is not None and metageneration is not None and int(
      p('ifMetagenerationNotMatch')) == metageneration:
    not_modified = True
  if failed or (not_modified and not read):
    _error(response, HTTPStatus.PRECONDITION_FAILED,
           'At least one of the pre-conditions you specified did not hold.', 'conditionNotMet')
    return False
  if not_modified:
    response.status = HTTPStatus.NOT_MODIFIED
    return False
  return True


def _generation_param_matches(request, obj) -> bool:
  """A request for a given generation= names the live one (no other is kept)."""
  wanted = _first(request, 'generation')
  return wanted is None or obj is None or int(wanted) == int(obj['generation'])


# ------------------------------------------------------------------ handlers
def get(request, response, storage, *args, **kwargs):
  """objects.get: metadata, or the media with alt=media; conditions and generation=."""
  if _first(request, 'alt') == 'media':
    return download(request, response, storage)
  if _first(request, 'softDeleted'):
    return objects.get(request, response, storage)
  obj = _live(storage, request.params['bucket_name'], request.params['object_id'])
  if obj is None or not _generation_param_matches(request, obj):
    return _error(response, HTTPStatus.NOT_FOUND, 'No such object.', 'notFound')
  if check_preconditions(request, response, obj, read=True):
    response.json(obj)


def _parse_range(header: str, size: int):
  """(start, end exclusive), None for the whole object, or 'unsatisfiable' (fix 9)."""
  spec = header.strip()
  if not spec.startswith('bytes=') or ',' in spec:
    return None  # Not a single byte range: GCS, like HTTP, may ignore it.
  first, _, last = spec[len('bytes='):].strip().partition('-')
  try:
    if first == '':
      n = int(last)
      return (max(size - n, 0), size) if n > 0 else 'unsatisfiable'
    start = int(first)
    end = size if last == '' else min(int(last) + 1, size)
  except ValueError:
    return None
  if start >= size:
    return 'unsatisfiable'
  return (start, end) if end > start else None


def download(request, response, storage, *args, **kwargs):
  """Media download (JSON alt=media, /download/..., XML GET): ranges, conditions, headers."""
  bucket, name = request.params['bucket_name'], request.params['object_id']
  obj = _live(storage, bucket, name)
  if obj is None or not _generation_param_matches(request, obj):
    return _error(response, HTTPStatus.NOT_FOUND, 'No such object.', 'notFound')
  if not check_preconditions(request, response, obj, read=True):
    return
  data = storage.get_file(bucket, name)
  size = len(data)
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj['metageneration'])
  response['x-goog-stored-content-length'] = str(size)
  response['x-goog-stored-content-encoding'] = obj.get('contentEncoding') or 'identity'
  response['x-goog-hash'] = 'crc32c={},md5={}'.format(obj['crc32c'], obj['md5Hash'])
  response['ETag'] = '"{}"'.format(obj.get('etag') or obj['md5Hash'])
  response['Accept-Ranges'] = 'bytes'
  for key, value in (obj.get('metadata') or {}).items():
    if value is not None:
      response[f'x-goog-meta-{key}'] = str(value)
  if 'response-content-disposition' in request.query:
    response['Content-Disposition'] = request.query['response-content-disposition'][0]
  header = request.get_header('Range')
  selected = _parse_range(header, size) if header and size else None
  if selected == 'unsatisfiable':
    response['Content-Range'] = f'bytes */{size}'
    return _error(response, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                  'The requested range cannot be satisfied.', 'requestedRangeNotSatisfiable')
  if selected is not None:
    start, end = selected
    response.status = HTTPStatus.PARTIAL_CONTENT
    response['Content-Range'] = f'bytes {start}-{end - 1}/{size}'
    data = data[start:end]
  response.write_file(data, content_type=obj.get('contentType') or 'application/octet-stream')


def _upload_target(request):
  """The bucket and object name of an upload request (the query's name wins, as GCS)."""
  name = _first(request, 'name')
  if name is None and isinstance(request.data, dict):
    name = (request.data.get('meta') or request.data).get('name')
  return request.params['bucket_name'], name


def insert(request, response, storage, *args, **kwargs):
  """objects.insert (media, multipart, the start of resumable) with its conditions."""
  upload_type = _first(request, 'uploadType')
  if upload_type in ('media', 'multipart', 'resumable') and 'upload_id' not in request.query:
    bucket, name = _upload_target(request)
    if not name:
      return _error(response, HTTPStatus.BAD_REQUEST, 'Required object name.', 'required')
    if bucket not in storage.buckets:
      return _error(response, HTTPStatus.NOT_FOUND, 'No such bucket.', 'notFound')
    if not check_preconditions(request, response, _live(storage, bucket, name), read=False):
      return
  elif 'upload_id' in request.query:
    return upload_partial(request, response, storage)
  return objects.insert(request, response, storage)


def upload_partial(request, response, storage, *args, **kwargs):
  """A resumable session's PUT: its conditions; no Range when nothing arrived (fix 10)."""
  upload_id = _first(request, 'upload_id')
  try:
    pending = storage.get_resumable_file_obj(upload_id)
  except NotFound:
    return _error(response, HTTPStatus.NOT_FOUND, 'No such upload session.', 'notFound')
  if not check_preconditions(
      request, response, _live(storage, pending['bucket'], pending['name']), read=False):
    return
  objects.upload_partial(request, response, storage)
  if (response.status == objects.GoogleHTTPStatus.RESUME_INCOMPLETE
      and storage.get_resumable_byte_count(upload_id) == 0):
    response._headers.pop('Range', None)


def xml_upload(request, response, storage, *args, **kwargs):
  """XML API PUT of a whole object (the emulator's, with b'' for no body)."""
  if request.params['bucket_name'] not in storage.buckets:
    return _error(response, HTTPStatus.NOT_FOUND, 'No such bucket.', 'notFound')
  return objects.xml_upload(request, response, storage)


def delete(request, response, storage, *args, **kwargs):
  """objects.delete: conditions, generation=, and 204 as GCS (fix 12)."""
  obj = _live(storage, request.params['bucket_name'], request.params['object_id'])
  if obj is None or not _generation_param_matches(request, obj):
    return _error(response, HTTPStatus.NOT_FOUND, 'No such object.', 'notFound')
  if check_preconditions(request, response, obj, read=False):
    objects.delete(request, response, storage)
    if response.status == HTTPStatus.OK:
      response.status = HTTPStatus.NO_CONTENT


def _copying(handler):
  """objects.copy / objects.rewrite with the source's and the destination's conditions."""
  def wrapped(request, response, storage, *args, **kwargs):
    p = request.params
    source = _live(storage, p['bucket_name'], p['object_id'])
    if source is None:
      return _error(response, HTTPStatus.NOT_FOUND, 'No such object.', 'notFound')
    if p['dest_bucket_name'] not in storage.buckets:
      return _error(response, HTTPStatus.NOT_FOUND, 'No such bucket.', 'notFound')
    if not check_preconditions(request, response, source, read=False, source=True):
      return
    if not check_preconditions(
        request, response, _live(storage, p['dest_bucket_name'], p['dest_object_id']),
        read=False):
      return
    return handler(request, response, storage)
  return wrapped


def patch(request, response, storage, *args, **kwargs):
  obj = _live(storage, request.params['bucket_name'], request.params['object_id'])
  if obj is None:
    return _error(response, HTTPStatus.NOT_FOUND, 'No such object.', 'notFound')
  if check_preconditions(request, response, obj, read=False):
    objects.patch(request, response, storage)


def ls(request, response, storage, *args, **kwargs):
  """objects.list with pages, key ranges and includeTrailingDelimiter (fix 11)."""
  bucket = request.params['bucket_name']
  if _first(request, 'softDeleted'):
    return objects.ls(request, response, storage)
  prefix = _first(request, 'prefix') or ''
  delimiter = _first(request, 'delimiter')
  glob = _first(request, 'matchGlob')
  start, end = _first(request, 'startOffset'), _first(request, 'endOffset')
  try:
    items, prefixes = storage.get_file_list(bucket, prefix or None, delimiter, glob)
  except NotFound:
    return _error(response, HTTPStatus.NOT_FOUND, 'No such bucket.', 'notFound')
  except Exception as e:  # BadRequest: a glob with another delimiter.
    return _error(response, HTTPStatus.BAD_REQUEST, str(e), 'invalid')
  def in_range(name):
    return (start is None or name >= start) and (end is None or name < end)
  entries = [(o['name'], o) for o in items if in_range(o['name'])]
  entries += [(q, None) for q in prefixes if in_range(q)]
  if delimiter and (_first(request, 'includeTrailingDelimiter') or '').lower() == 'true':
    # Objects named like a prefix ('dir/') are items too, besides the prefix.
    entries += [(q, o) for q in prefixes
                if in_range(q) and (o := _live(storage, bucket, q)) is not None]
  entries.sort(key=lambda e: (e[0], e[1] is None))
  token = _first(request, 'pageToken')
  if token:
    after = urllib.parse.unquote(token)
    entries = [e for e in entries if e[0] > after]
  limit = min(int(_first(request, 'maxResults') or 1000), 1000)
  page, rest = entries[:limit], entries[limit:]
  out = {'kind': 'storage#objects',
         'items': [o for _, o in page if o is not None],
         'prefixes': [n for n, o in page if o is None]}
  if rest:
    out['nextPageToken'] = urllib.parse.quote(page[-1][0], safe='')
  response.json(out)


# The emulator's routes, each handler swapped for its fixed version.
_REPLACED = {
    objects.get: get, objects.download: download, objects.insert: insert,
    objects.upload_partial: upload_partial, objects.xml_upload: xml_upload,
    objects.delete: delete, objects.copy: _copying(objects.copy),
    objects.rewrite: _copying(objects.rewrite), objects.patch: patch, objects.ls: ls,
}
ROUTES = [(re.compile(regex), {m: _REPLACED.get(h, h) for m, h in handlers.items()})
          for regex, handlers in gse.HANDLERS]


# ------------------------------------------------------------------ HTTP (fixes 3, 4, 12)
class Handler(http_server.BaseHTTPRequestHandler):
  """One connection: HTTP/1.1, bodies read whole first, one storage call at a time."""

  protocol_version = 'HTTP/1.1'
  storage: Storage = None  # Set by serve().
  log_headers = False

  def address_string(self):
    return self.client_address[0] if self.client_address else 'unix'

  def log_message(self, format, *args):
    log.info('%s %s', self.address_string(), format % args)

  def _handle(self, method: str, head: bool = False) -> None:
    if self.log_headers:
      log.info('%s %s headers: %s', method, self.path, dict(self.headers.items()))
    try:
      body = read_body(self.rfile, self.headers)
    except TruncatedBody:
      # Fix 3: store nothing, answer nothing; the client sees a dropped connection.
      log.warning('%s %s: body cut short, request dropped', method, self.path)
      self.close_connection = True
      return
    except (ValueError, OSError) as e:
      log.warning('%s %s: unreadable body (%s)', method, self.path, e)
      self.close_connection = True
      return
    method = self.headers.get('X-HTTP-Method-Override') or method
    request = Request(self, method, body)
    response = gse.Response(self)
    with _LOCK:
      try:
        self._dispatch(request, response)
      except Exception as e:  # Fix 12: an answer, not a dropped connection.
        log.error('%s %s failed:\n%s', method, self.path, traceback.format_exc())
        response = gse.Response(self)
        _error(response, HTTPStatus.INTERNAL_SERVER_ERROR, f'emulator error: {e!r}',
               'backendError')
    if head:
      content = response._content
      response._content = b''
      response._headers['Content-Length'] = str(len(content.encode() if isinstance(
          content, str) else content))
      self._send_head_only(response)
    else:
      response.close()

  def _send_head_only(self, response) -> None:
    self.send_response(response.status.value, response.status.phrase)
    for key, value in response._headers.items():
      self.send_header(key, value)
    self.end_headers()

  def _dispatch(self, request, response) -> None:
    for pattern, handlers in ROUTES:
      match = pattern.fullmatch(request.path)
      if not match:
        continue
      request.set_match(match)
      handler = handlers.get(request.method)
      if handler is None and request.method == 'POST' and _first(request, 'uploadType') and (
          request.path.endswith('/o')):
        handler = insert  # Uploads POSTed without the /upload prefix, as the emulator allows.
      if handler is None:
        break
      handler(request, response, self.storage)
      return
    _error(response, HTTPStatus.NOT_IMPLEMENTED,
           f'not implemented: {request.method} {request.path}', 'notImplemented')

  def do_GET(self):
    self._handle('GET')

  def do_HEAD(self):
    self._handle('GET', head=True)

  def do_POST(self):
    self._handle('POST')

  def do_PUT(self):
    self._handle('PUT')

  def do_DELETE(self):
    self._handle('DELETE')

  def do_PATCH(self):
    self._handle('PATCH')


class TCPServer(http_server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
  daemon_threads = True


def serve(data_dir: str, port: int, unix_path: str, bucket: str) -> None:
  """Serves `data_dir` on 127.0.0.1:`port` and on `unix_path` until killed."""
  storage = Storage(data_dir=os.path.abspath(data_dir))
  if buckets.create_bucket(bucket, storage):
    # Deleted objects need not be kept for a week in a test bucket: every delete would copy
    # the object. Nothing the tests' clients do reads soft-deleted objects.
    storage.buckets[bucket]['softDeletePolicy'] = {'retentionDurationSeconds': '0'}
    storage._write_config_to_file()
  Storage._last_generation = max(
      [int(o['generation']) for b in storage.objects.values() for o in b.values()] + [0])
  Handler.storage = storage
  servers = [TCPServer(('127.0.0.1', port), Handler)]
  if unix_path:
    if os.path.exists(unix_path):
      os.unlink(unix_path)  # The socket of an earlier run of this server.
    servers.append(UnixServer(unix_path, Handler))
  for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
  print(f'READY {servers[0].server_address[1]}', flush=True)
  servers[0].serve_forever()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--unix', default='')
  parser.add_argument('--bucket', default='bkt')
  parser.add_argument('--log', default='', help='request log (default: stderr)')
  parser.add_argument('--log-headers', action='store_true', help="log every request's headers")
  args = parser.parse_args(argv)
  handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler()
  handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s %(message)s'))
  logging.getLogger().addHandler(handler)
  logging.getLogger().setLevel(logging.WARNING)
  log.setLevel(logging.INFO)
  Handler.log_headers = args.log_headers
  serve(args.data_dir, args.port, args.unix, args.bucket)


if __name__ == '__main__':
  sys.exit(main())
