"""The GCS world (tests/gcs_world.py) against its real server: every client of the project,
run as a job inside the world, reads and writes gs:// as it would on Google Cloud, and the
test reads the same bytes back over plain HTTP, without any client library.

One world for the module; each test uses a prefix of its own in the bucket. The TF job runs
once (a module fixture) and several tests check its parts: TF's import is most of its time.
"""
import hashlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import time

import google_crc32c
import numpy as np
import pytest

from _multiprocess import multiprocess_env
from gcs_world import GcsWorld, gcs_world  # noqa: F401  (gcs_world: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 5 << 20  # Several MiB in one resumable-upload PUT.


def big_bytes() -> bytes:
  return np.random.default_rng(0).bytes(BIG)


def tfrecords(data: bytes) -> list[bytes]:
  """The records of a TFRecord file, their CRCs checked: TF's framing, read without TF."""
  def masked_crc(b):
    crc = google_crc32c.value(b)
    return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff
  records, i = [], 0
  while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[i + 8:i + 12])[0] == masked_crc(header)
    record = data[i + 12:i + 12 + length]
    assert struct.unpack('<I', data[i + 12 + length:i + 16 + length])[0] == masked_crc(record)
    records.append(record)
    i += 16 + length
  return records


def job(code: str) -> list[str]:
  return [sys.executable, '-c', textwrap.dedent(code)]


def last_json(stdout: str) -> dict:
  """The job's result: its last line that is a JSON object (gloo prints lines of its own)."""
  return json.loads([line for line in stdout.splitlines() if line.startswith('{')][-1])


def readline(proc: subprocess.Popen, timeout: float) -> str:
  """The next line of a job's stdout, or a failure that says what the job printed."""
  ready, _, _ = select.select([proc.stdout], [], [], timeout)
  line = proc.stdout.readline() if ready else ''
  if not line:
    proc.kill()
    raise AssertionError(f'no line from the job within {timeout} s (exit code {proc.poll()})')
  return line.strip()


# ------------------------------------------------------------------ TensorFlow's client
_TF_JOB = '''
import hashlib, json, sys
import numpy as np
import tensorflow as tf

B = sys.argv[1]  # gs://bkt/tf
gfile = tf.io.gfile
out = {}
gfile.makedirs(f'{B}/dir/sub')
with gfile.GFile(f'{B}/dir/sub/a.txt', 'w') as f:
  f.write('hello gcs')
with gfile.GFile(f'{B}/dir/b.txt', 'w') as f:
  f.write('to be replaced')
out['exists'] = [gfile.exists(f'{B}/dir/sub/a.txt'), gfile.exists(f'{B}/dir/none')]
out['isdir'] = [gfile.isdir(f'{B}/dir'), gfile.isdir(f'{B}/dir/sub'),
                gfile.isdir(f'{B}/dir/b.txt')]
out['listdir'] = sorted(gfile.listdir(f'{B}/dir'))
out['glob'] = sorted(gfile.glob(f'{B}/dir/*/*.txt'))
out['read'] = gfile.GFile(f'{B}/dir/sub/a.txt').read()
gfile.rename(f'{B}/dir/sub/a.txt', f'{B}/dir/b.txt', overwrite=True)
out['renamed'] = [gfile.exists(f'{B}/dir/sub/a.txt'), gfile.GFile(f'{B}/dir/b.txt').read()]
with gfile.GFile(f'{B}/dir/gone.txt', 'w') as f:
  f.write('x')
gfile.remove(f'{B}/dir/gone.txt')
out['removed'] = gfile.exists(f'{B}/dir/gone.txt')
with gfile.GFile(f'{B}/empty', 'w') as f:
  f.write('')  # GFile opens lazily: an object only with a write.
big = np.random.default_rng(0).bytes(5 << 20)
with gfile.GFile(f'{B}/big.bin', 'wb') as f:
  f.write(big)
out['sizes'] = [gfile.stat(f'{B}/empty').length, gfile.stat(f'{B}/big.bin').length,
                gfile.stat(f'{B}/dir/b.txt').length]
out['big_read_back'] = gfile.GFile(f'{B}/big.bin', 'rb').read() == big
with gfile.GFile(f'{B}/big.bin', 'rb') as f:  # A ranged read in the middle.
  f.seek(3 << 20)
  out['big_seek'] = f.read(16) == big[3 << 20:(3 << 20) + 16]
out['from_pytest'] = hashlib.sha256(gfile.GFile(f'{B}/from_pytest.bin', 'rb').read()).hexdigest()

# tf.summary: the event file is created (and uploaded) first, then uploaded whole at flushes.
writer = tf.summary.create_file_writer(f'{B}/tb')
with writer.as_default():
  for step in range(5):
    tf.summary.scalar('loss', 1.0 / (step + 1), step=step)
  writer.flush()
writer.close()
events = gfile.glob(f'{B}/tb/events.out.tfevents.*')
out['events'] = [e.split('/')[-1] for e in events]
out['scalars'] = [[e.step, v.tag, float(tf.make_ndarray(v.tensor))]
                  for e in tf.compat.v1.train.summary_iterator(events[0])
                  for v in e.summary.value]

# A TFRecord file written with TF's writer and read back with tf.data.
records = [f'record {i} '.encode() * (i + 1) for i in range(50)]
with tf.io.TFRecordWriter(f'{B}/data/r.tfrecord') as w:
  for r in records:
    w.write(r)
out['tfdata'] = [r.numpy() for r in tf.data.TFRecordDataset(f'{B}/data/r.tfrecord')] == records
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def tf_job(gcs_world):  # noqa: F811
  """The TF job's observations (a dict), once for the module."""
  gcs_world.write('tf/from_pytest.bin', b'written by the test over HTTP\x00\xff' * 1000)
  result = gcs_world.run(job(_TF_JOB) + [gcs_world.url('tf')], timeout=240)
  return last_json(result.stdout)


def test_tf_gfile_operations(gcs_world, tf_job):  # noqa: F811
  assert tf_job['exists'] == [True, False]
  assert tf_job['isdir'] == [True, True, False]
  assert tf_job['listdir'] == ['b.txt', 'sub/']
  assert tf_job['glob'] == ['gs://bkt/tf/dir/sub/a.txt']
  assert tf_job['read'] == 'hello gcs'
  assert tf_job['renamed'] == [False, 'hello gcs']  # rename over an existing object
  assert tf_job['removed'] is False
  assert tf_job['sizes'] == [0, BIG, len('hello gcs')]
  assert tf_job['from_pytest'] == hashlib.sha256(
      b'written by the test over HTTP\x00\xff' * 1000).hexdigest()
  # What TF wrote, as the server holds it. makedirs leaves directory markers, as on GCS.
  assert gcs_world.list('tf/dir') == ['tf/dir/', 'tf/dir/b.txt', 'tf/dir/sub/']
  assert gcs_world.read('tf/dir/b.txt') == b'hello gcs'
  assert gcs_world.read('tf/empty') == b''
  assert gcs_world.stat('tf/empty')['size'] == '0'


def test_tf_multi_mib_object(gcs_world, tf_job):  # noqa: F811
  assert tf_job['big_read_back'] and tf_job['big_seek']
  assert gcs_world.read('tf/big.bin') == big_bytes()


def test_tf_summary_event_file(gcs_world, tf_job):  # noqa: F811
  assert len(tf_job['events']) == 1
  assert tf_job['scalars'] == [[s, 'loss', pytest.approx(1.0 / (s + 1))] for s in range(5)]
  data = gcs_world.read('tf/tb/' + tf_job['events'][0])
  records = tfrecords(data)  # An event file is TFRecord-framed Event protos.
  assert sum(b'loss' in r for r in records) == 5
  assert b'brain.Event:2' in records[0]  # The file version record, written first.


def test_tfrecord_with_tf_data(gcs_world, tf_job):  # noqa: F811
  assert tf_job['tfdata'] is True
  assert tfrecords(gcs_world.read('tf/data/r.tfrecord')) == [
      f'record {i} '.encode() * (i + 1) for i in range(50)]


# ------------------------------------------------------------------ tensorstore and Orbax
_ORBAX_JOB = '''
import json, sys, traceback
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

B = sys.argv[1]  # gs://bkt/ckpt
tree = {'w': jnp.arange(24, dtype=jnp.float32).reshape(4, 6),
        'opt': {'count': jnp.array(7, jnp.int32), 'mu': jnp.linspace(0, 1, 5)}}
same = lambda a, b: all(jax.tree.leaves(jax.tree.map(
    lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))
out = {}

def standard():
  with ocp.StandardCheckpointer() as c:
    c.save(f'{B}/std', tree)
    c.wait_until_finished()
  with ocp.StandardCheckpointer() as c:
    return {'restored': same(c.restore(f'{B}/std', tree), tree)}

def manager():
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(f'{B}/manager', options=options) as m:
    for step in (1, 2, 3):
      m.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, tree)))
    m.wait_until_finished()
  with ocp.CheckpointManager(f'{B}/manager') as m:
    return {'steps': m.all_steps(),
            'restored': same(m.restore(3, args=ocp.args.StandardRestore(tree)),
                             jax.tree.map(lambda x: x * 3, tree))}

def tensorstore():
  # What the OCDBT manifest and tensorstore's cache rely on, from tensorstore itself.
  kv = ts.KvStore.open({'driver': 'gcs', 'bucket': B.split('/')[2], 'path': 'ts/'}).result()
  g1 = kv.write('c', b'1').result().generation
  g2 = kv.write('c', b'2', if_equal=g1).result().generation
  stale = kv.write('c', b'3', if_equal=g1).result().generation  # b'': not written
  kv.write('empty', b'').result()
  return {'generations': [g1 != b'', g2 not in (b'', g1), stale == b''],
          'value': kv.read('c').result().value.decode(),
          'unchanged': kv.read('c', if_not_equal=g2).result().state,
          'suffix': kv.read('c', byte_range=slice(-1, None)).result().value.decode(),
          'empty': kv.read('empty').result().value.decode()}

for name, part in (('standard', standard), ('manager', manager), ('tensorstore', tensorstore)):
  try:
    out[name] = part()
  except Exception:
    out[name] = {'error': traceback.format_exc()[-3000:]}
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def orbax_job(gcs_world):  # noqa: F811
  """One job for Orbax and tensorstore (jax, orbax, TF through etils.epath: ~10 s to import)."""
  result = gcs_world.run(job(_ORBAX_JOB) + [gcs_world.url('ckpt')],
                         env=gcs_world.env(dict(os.environ, JAX_PLATFORMS='cpu')), timeout=240)
  return last_json(result.stdout)


def test_orbax_standard_checkpointer(gcs_world, orbax_job):  # noqa: F811
  """Orbax on gs://: arrays by tensorstore (OCDBT, conditional manifest writes), metadata by
  etils.epath through tf.io.gfile."""
  assert orbax_job['standard'] == {'restored': True}
  names = gcs_world.list('ckpt/std/')
  for name in ('_CHECKPOINT_METADATA', '_METADATA', 'manifest.ocdbt', 'commit_success.txt',
               'ocdbt.process_0/manifest.ocdbt'):
    assert f'ckpt/std/{name}' in names, names
  assert json.loads(gcs_world.read('ckpt/std/_METADATA'))['tree_metadata']


def test_orbax_checkpoint_manager(gcs_world, orbax_job):  # noqa: F811
  """CheckpointManager also asks google-cloud-storage whether the bucket has a hierarchical
  namespace (orbax 0.12.8, for any gs:// directory): STORAGE_EMULATOR_HOST in the job's
  environment makes that client anonymous and sends it to the world's server."""
  assert orbax_job['manager'] == {'steps': [2, 3], 'restored': True}
  assert {n.split('/')[2] for n in gcs_world.list('ckpt/manager/')} - {''} == {'2', '3'}


def test_tensorstore_conditions_ranges_and_empty_values(gcs_world, orbax_job):  # noqa: F811
  """A stale conditional write is refused, a read of the cached generation answers
  'unchanged' (304), a suffix byte range and an empty value work (emulator fixes 1, 8, 9)."""
  assert orbax_job['tensorstore'] == {
      'generations': [True, True, True], 'value': '2', 'unchanged': 'unspecified',
      'suffix': '2', 'empty': ''}
  assert gcs_world.read('ts/c') == b'2'


# ------------------------------------------------------------------ the server goes away
_OUTAGE_JOB = '''
import json, sys, threading, time
import tensorflow as tf
import tensorstore as ts

B = sys.argv[1]  # gs://bkt/outage
kv = ts.KvStore.open({'driver': 'gcs', 'bucket': B.split('/')[2], 'path': 'outage/'}).result()
with tf.io.gfile.GFile(f'{B}/tf_before.txt', 'w') as f:
  f.write('before')
kv.write('ts_before', b'before').result()
print('READY', flush=True)
sys.stdin.readline()  # The server is down from here.
out = {}

def attempt(name, write):
  start = time.monotonic()
  try:
    write()
    out[name] = {'ok': True, 'seconds': time.monotonic() - start}
  except Exception as e:
    out[name] = {'ok': False, 'seconds': time.monotonic() - start, 'error': repr(e)[:500]}

def tf_write():
  with tf.io.gfile.GFile(f'{B}/tf_during.txt', 'w') as f:
    f.write('during')

def ts_write():
  kv.write('ts_during', b'during').result()

threads = [threading.Thread(target=attempt, args=('tf', tf_write)),
           threading.Thread(target=attempt, args=('tensorstore', ts_write))]
for t in threads:
  t.start()
for t in threads:
  t.join()
out['tf_before'] = tf.io.gfile.GFile(f'{B}/tf_before.txt').read()
out['ts_before'] = kv.read('ts_before').result().value.decode()
print(json.dumps(out))
'''
OUTAGE = 5.0


def test_server_outage_and_restart(gcs_world, tmp_path):  # noqa: F811
  """SIGKILL the server while a job writes, restart it OUTAGE s later: TF's client and
  tensorstore both retry and their writes land after the restart; what was written before
  survives. (Measured with the server down for good: TF retries 10 times, 1 s doubling to
  32 s, and raises AbortedError after ~190 s; tensorstore retries 32 times and raises
  ValueError 'ABORTED: All 32 retry attempts failed' after ~15 min.)"""
  stderr = open(tmp_path / 'job.stderr', 'w')
  proc = gcs_world.popen(job(_OUTAGE_JOB) + [gcs_world.url('outage')], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=stderr, text=True)
  assert readline(proc, 180) == 'READY'
  gcs_world.stop_server()
  with pytest.raises(ConnectionRefusedError):
    gcs_world.list()  # Down for the test too.
  proc.stdin.write('go\n')
  proc.stdin.flush()
  time.sleep(OUTAGE)
  assert proc.poll() is None, 'the job gave up while the server was down'
  gcs_world.start_server()
  stdout, _ = proc.communicate(timeout=120)
  out = last_json(stdout)
  for client in ('tf', 'tensorstore'):
    assert out[client]['ok'], out
    assert out[client]['seconds'] > OUTAGE - 1, out  # It waited for the server.
  assert out['tf_before'] == out['ts_before'] == 'before'
  assert gcs_world.read('outage/tf_during.txt') == b'during'
  assert gcs_world.read('outage/ts_during') == b'during'
  assert gcs_world.read('outage/tf_before.txt') == b'before'


# ------------------------------------------------------------------ the namespace itself
_LISTEN = '''
import socket
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b'pong ' + c.recv(100))
c.close()
'''
_CONNECT = '''
import errno, json, socket, sys
out = {}
with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10) as c:
  c.sendall(b'ping')
  out['reply'] = c.recv(100).decode()
out['google'] = [socket.gethostbyname(h) for h in
                 ('storage.googleapis.com', 'www.googleapis.com', 'metadata.google.internal')]
try:
  socket.getaddrinfo('example.com', 443)
  out['dns'] = 'resolved'
except socket.gaierror:
  out['dns'] = 'no such name'
try:
  socket.create_connection(('8.8.8.8', 53), timeout=5)
  out['outside'] = 'connected'
except OSError as e:
  out['outside'] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(out))
'''


def test_jobs_talk_over_loopback_and_reach_nothing_else(gcs_world):  # noqa: F811
  server = gcs_world.popen(job(_LISTEN), stdout=subprocess.PIPE, text=True)
  port = readline(server, 30)
  out = last_json(gcs_world.run(job(_CONNECT) + [port], timeout=60).stdout)
  assert server.wait(timeout=30) == 0
  assert out['reply'] == 'pong ping'
  assert out['google'] == ['127.0.0.1'] * 3
  assert out['dns'] == 'no such name'
  assert out['outside'] == 'ENETUNREACH'  # Only a loopback interface: no route out.


_DISTRIBUTED = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(f'127.0.0.1:{sys.argv[1]}', num_processes=2,
                           process_id=int(sys.argv[2]))
gathered = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1.0]))
print(json.dumps({'gathered': np.asarray(gathered).ravel().tolist(),
                  'devices': jax.device_count()}))
'''


def test_jax_distributed_between_jobs(gcs_world):  # noqa: F811
  """Two processes of one JAX job in the world: the coordinator on 127.0.0.1, gloo
  collectives (they resolve the host name, which the world's hosts file makes loopback)."""
  env = gcs_world.env(multiprocess_env(dict(
      os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')))
  port = '47301'  # Any: the world's loopback is its own, nothing else listens there.
  procs = [gcs_world.popen(job(_DISTRIBUTED) + [port, str(i)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert last_json(stdout) == {'gathered': [1.0, 2.0], 'devices': 4}


def test_close_kills_everything(tmp_path):
  """Even a job's daemon that left its process group is gone after close()."""
  world = GcsWorld(tmp_path / 'world').start()
  try:
    proc = world.popen(['sh', '-c', 'setsid sleep 600 & echo $!; wait'],
                       stdout=subprocess.PIPE, text=True)
    daemon = int(readline(proc, 30))
    server, holder = world._server.pid, world._holder.pid
  finally:
    world.close()
  time.sleep(0.2)
  for pid in (daemon, server, holder):
    try:
      os.kill(pid, 0)
      state = open(f'/proc/{pid}/stat').read().split()[2]
      assert state == 'Z', f'process {pid} still runs'
    except ProcessLookupError:
      pass
  assert not os.path.exists(world.unix_socket)


# ------------------------------------------------------------------ the server's fixes
def _raw(world, request: bytes) -> tuple[int, dict, bytes]:
  """One raw HTTP/1.1 exchange: requests that http.client would not send as they are."""
  with socket.create_connection(('127.0.0.1', world.port), timeout=30) as s:
    s.sendall(request)
    data = b''
    while True:
      while b'\r\n\r\n' not in data:
        data += s.recv(65536)
      head, body = data.split(b'\r\n\r\n', 1)
      if not head.startswith(b'HTTP/1.1 100 '):
        break
      data = body  # `100 Continue` (the request had `Expect: 100-continue`): the answer is next.
    lines = head.decode().split('\r\n')
    headers = {k.lower(): v.strip() for k, v in (l.split(':', 1) for l in lines[1:])}
    while len(body) < int(headers.get('content-length', 0)):
      body += s.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_emulator_fixes(gcs_world):  # noqa: F811
  """The requests of TF's client and tensorstore that the unfixed emulator got wrong
  (tests/gcs/emulator.py numbers the fixes)."""
  w, b = gcs_world, gcs_world.bucket
  upload = f'/upload/storage/v1/b/{b}/o?uploadType=media&name='
  # 1: an empty body (TF's directory marker: a media upload with ifGenerationMatch=0).
  status, _, body = _raw(w, f'POST {upload}fix/dir/&ifGenerationMatch=0 HTTP/1.1\r\n'
                            f'Host: x\r\nContent-Length: 0\r\nTransfer-Encoding: identity\r\n'
                            f'Expect: 100-continue\r\n\r\n'.encode())
  assert status == 200 and json.loads(body)['size'] == '0'
  # 8: the same request again: the object exists now.
  assert _raw(w, f'POST {upload}fix/dir/&ifGenerationMatch=0 HTTP/1.1\r\nHost: x\r\n'
                 f'Content-Length: 0\r\n\r\n'.encode())[0] == 412
  # 5: 'fix/dir/' and 'fix/dir/a' are both objects.
  # 2: chunked with a Content-Length (TF's resumable PUTs): the chunks are the data.
  status, _, body = _raw(w, f'POST {upload}fix/dir/a HTTP/1.1\r\nHost: x\r\n'
                            f'Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n'
                            f'5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n'.encode())
  assert status == 200, body
  assert w.read('fix/dir/a') == b'hello world' and w.read('fix/dir/') == b''
  generation = json.loads(body)['generation']
  # 9: ranges and x-goog-generation.
  obj = f'/download/storage/v1/b/{b}/o/fix%2Fdir%2Fa?alt=media'
  status, headers, body = _raw(w, f'GET {obj} HTTP/1.1\r\nHost: x\r\nRange: bytes=-5\r\n\r\n'
                               .encode())
  assert (status, body, headers['content-range']) == (206, b'world', 'bytes 6-10/11')
  assert headers['x-goog-generation'] == generation
  assert _raw(w, f'GET {obj} HTTP/1.1\r\nHost: x\r\nRange: bytes=11-\r\n\r\n'.encode())[0] == 416
  # 8: a read of a cached generation is 304, a write against a stale one 412.
  assert _raw(w, f'GET {obj}&ifGenerationNotMatch={generation} HTTP/1.1\r\nHost: x\r\n\r\n'
              .encode())[0] == 304
  assert _raw(w, f'POST {upload}fix/dir/a&ifGenerationMatch=1 HTTP/1.1\r\nHost: x\r\n'
                 f'Content-Length: 1\r\n\r\nx'.encode())[0] == 412
  # 3: a body cut short is not stored.
  with socket.create_connection(('127.0.0.1', w.port), timeout=30) as s:
    s.sendall(f'POST {upload}fix/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n'
              f'only part'.encode())
    s.shutdown(socket.SHUT_WR)
    assert s.recv(100) == b''  # Dropped, unanswered.
  with pytest.raises(FileNotFoundError):
    w.read('fix/cut')
  # 10: the status of a resumable session that has received nothing has no Range.
  status, headers, _ = _raw(w, f'POST {upload.replace("media", "resumable")}fix/r HTTP/1.1\r\n'
                               f'Host: x\r\nX-Upload-Content-Length: 3\r\nContent-Length: 0\r\n'
                               f'\r\n'.encode())
  session = headers['location'].split('://', 1)[1].split('/', 1)[1]
  status, headers, _ = _raw(w, f'PUT /{session} HTTP/1.1\r\nHost: x\r\nContent-Range: bytes */3'
                               f'\r\nContent-Length: 0\r\n\r\n'.encode())
  assert status == 308 and 'range' not in headers
  # 11: pages.
  status, _, body = _raw(w, f'GET /storage/v1/b/{b}/o?prefix=fix/&maxResults=1 HTTP/1.1\r\n'
                            f'Host: x\r\n\r\n'.encode())
  page = json.loads(body)
  assert [i['name'] for i in page['items']] == ['fix/dir/'] and page['nextPageToken']
  # 12: DELETE answers 204.
  assert _raw(w, f'DELETE /storage/v1/b/{b}/o/fix%2Fdir%2Fa HTTP/1.1\r\nHost: x\r\n\r\n'
              .encode())[0] == 204
