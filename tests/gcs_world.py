"""A Google Cloud Storage server on loopback that the project's clients reach as real GCS.

`GcsWorld` runs the tests' GCS server (tests/gcs/emulator.py: gcp-storage-emulator with its
defects fixed on the server side) on the host's 127.0.0.1, and a network + mount namespace
(tests/gcs/netns.py) into which jobs are entered with nsenter. In there every client
reaches the server unmodified, by the names and ports it would use for real:

- TensorFlow's GCS client (tf.io.gfile, tf.summary, tf.data, TFDS, and etils.epath on
  gs://, which Orbax uses) calls https://storage.googleapis.com and https://www.googleapis.com
  whatever the environment says. /etc/hosts (replaced in the mount namespace) makes those
  names 127.0.0.1, where a relay terminates TLS with a certificate of the world's own CA
  (trusted through CURL_CA_BUNDLE) on port 443 and relays plain HTTP on port 80.
- tensorstore (Orbax's array writer) follows TENSORSTORE_GCS_HTTP_URL, a plain port.

No request leaves the machine: a job's network namespace has a loopback interface and nothing
else, so an address that is not 127.0.0.0/8 or ::1 cannot even be routed to; the relays reach
the server through a Unix socket, a path in the file system. The pytest process talks to the
server directly over the host's loopback, which tests/conftest.py's socket guard allows.
Credentials never come into it: GOOGLE_AUTH_TOKEN_FOR_TESTING gives TF and tensorstore a
fixed token (neither then looks for credential files or a metadata server), NO_GCE_CHECK
stops TF's metadata probe, and the metadata host names and variables point at loopback.

Usage, in a test module (module scope: the world starts in ~1 s, but jobs in it import TF):

    from gcs_world import gcs_world  # noqa: F401  (the fixture)

    def test_something(gcs_world):
      gcs_world.run([sys.executable, '-c', f'import tensorflow as tf; '
                     f'tf.io.gfile.GFile({gcs_world.url("a.txt")!r}, "w").write("hi")'])
      assert gcs_world.read('a.txt') == b'hi'

The namespace needs `unshare` and `nsenter` (util-linux) and a kernel that lets this user
create network and mount namespaces (as root, or through a user namespace). Where it cannot,
`start` fails and names what is missing; the tests are not skipped.
"""
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR = os.path.join(_HERE, 'gcs', 'emulator.py')
NETNS = os.path.join(_HERE, 'gcs', 'netns.py')

# Every Google name a client of the project (TF, tensorstore, google-auth, TFDS) may look up:
# all of them are 127.0.0.1 in the world.
GOOGLE_HOSTS = (
    'storage.googleapis.com', 'www.googleapis.com', 'googleapis.com',
    'oauth2.googleapis.com', 'accounts.google.com', 'iamcredentials.googleapis.com',
    'sts.googleapis.com', 'storage.mtls.googleapis.com', 'storage.cloud.google.com',
    'metadata.google.internal', 'metadata',
)
# Variables a job must not inherit: credentials would make a client authenticate for real,
# a proxy would route its requests to a host that does not exist in the world.
_DROPPED_ENV = ('GOOGLE_APPLICATION_CREDENTIALS', 'EPATH_USE_TF', 'http_proxy', 'https_proxy',
                'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY', 'TENSORSTORE_GCS_BACKEND')
_TOKEN = 'heptapod-gcs-world-token'


def _die_with_parent() -> list[str]:
  """A prefix that has the command killed when the test process dies, even by SIGKILL.

  setpriv sets the signal and execs, so that it needs no preexec_fn: a fork of this
  multi-threaded process that runs Python code in the child could deadlock (JAX warns).
  """
  setpriv = shutil.which('setpriv')
  return [setpriv, '--pdeathsig', 'SIGKILL'] if setpriv else []


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float, what: str,
                   log_path: str) -> str:
  """The first stdout line of `proc` starting with `prefix`; raises if it exits first."""
  deadline = time.monotonic() + timeout
  buffered = b''
  while time.monotonic() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 0.1)
    if ready:
      chunk = os.read(proc.stdout.fileno(), 4096)
      buffered += chunk
      for line in buffered.decode(errors='replace').splitlines():
        if line.startswith(prefix):
          return line
      if not chunk and proc.poll() is not None:
        break
    elif proc.poll() is not None:
      break
  proc.kill()
  proc.wait()
  log = open(log_path, errors='replace').read()[-3000:] if os.path.exists(log_path) else ''
  raise RuntimeError(f'{what} did not start (exit code {proc.returncode}); stdout: '
                     f'{buffered.decode(errors="replace")[-1000:]!r}; its log ({log_path}):\n'
                     f'{log}')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _make_certificates(directory: str) -> tuple[str, str, str]:
  """A CA and a server certificate for every name in GOOGLE_HOSTS: (ca, chain, key) paths."""
  openssl = shutil.which('openssl')
  if not openssl:
    raise RuntimeError('the GCS world needs the openssl command to make its TLS certificate')
  ca_key, ca = os.path.join(directory, 'ca.key'), os.path.join(directory, 'ca.pem')
  key, csr = os.path.join(directory, 'server.key'), os.path.join(directory, 'server.csr')
  cert, chain = os.path.join(directory, 'server.pem'), os.path.join(directory, 'chain.pem')
  ext = os.path.join(directory, 'server.ext')
  with open(ext, 'w') as f:
    f.write('basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n'
            'extendedKeyUsage=serverAuth\nsubjectAltName=' + ','.join(
                [f'DNS:{h}' for h in GOOGLE_HOSTS] + ['DNS:localhost', 'IP:127.0.0.1']) + '\n')
  ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']
  for argv in (
      ['req', '-x509', *ec, '-keyout', ca_key, '-out', ca, '-days', '30',
       '-subj', '/CN=heptapod gcs_world test CA',
       '-addext', 'basicConstraints=critical,CA:TRUE',
       '-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
      ['req', *ec, '-keyout', key, '-out', csr, '-subj', '/CN=storage.googleapis.com'],
      ['x509', '-req', '-in', csr, '-CA', ca, '-CAkey', ca_key, '-CAcreateserial',
       '-out', cert, '-days', '30', '-extfile', ext]):
    subprocess.run([openssl, *argv], check=True, capture_output=True, timeout=60)
  with open(chain, 'w') as f:
    f.write(open(cert).read() + open(ca).read())
  return ca, chain, key


class JobFailed(subprocess.CalledProcessError):
  """A job's non-zero exit, with the end of its output in the message."""

  def __str__(self):
    def tail(out):
      return (out if isinstance(out, str) else (out or b'').decode(errors='replace'))[-4000:]
    return (f'{super().__str__()}\n--- stdout (end) ---\n{tail(self.stdout)}\n'
            f'--- stderr (end) ---\n{tail(self.stderr)}')


class GcsWorld:
  """The GCS server, the namespace its clients run in, and direct access to its bucket.

  tmp_dir holds the server's data (kept across stop_server/start_server), its certificate
  and logs: server.log (every request with its status; log_headers: their headers too) and
  netns.log.
  """

  def __init__(self, tmp_dir, bucket: str = 'bkt', log_headers: bool = False):
    self.tmp_dir = os.path.abspath(os.fspath(tmp_dir))
    self.bucket = bucket
    self.log_headers = log_headers
    self.port = None
    self.ca_bundle = None
    self.server_log = os.path.join(self.tmp_dir, 'server.log')
    self.netns_log = os.path.join(self.tmp_dir, 'netns.log')
    self._data_dir = os.path.join(self.tmp_dir, 'data')
    self._server = None
    self._holder = None
    self._socket_dir = None
    self._jobs: list[subprocess.Popen] = []
    self._netns_id = None

  # ---------------------------------------------------------------- life cycle
  def start(self) -> 'GcsWorld':
    """Starts the server and the namespace; ready for jobs when it returns."""
    missing = [tool for tool in ('unshare', 'nsenter') if not shutil.which(tool)]
    if missing:
      raise RuntimeError(f'the GCS world needs {" and ".join(missing)} (util-linux) to run '
                         'jobs in a network namespace of their own')
    os.makedirs(self._data_dir, exist_ok=True)
    tls_dir = os.path.join(self.tmp_dir, 'tls')
    os.makedirs(tls_dir, exist_ok=True)
    self.ca_bundle, chain, key = _make_certificates(tls_dir)
    self._cloudsdk_config = os.path.join(self.tmp_dir, 'gcloud')  # Empty: no credentials.
    os.makedirs(self._cloudsdk_config, exist_ok=True)
    # A Unix socket's path has at most 107 bytes: a short directory of its own.
    self._socket_dir = tempfile.mkdtemp(prefix='gcsw-', dir='/tmp')
    self.unix_socket = os.path.join(self._socket_dir, 'gcs.sock')
    self.port = _free_port()
    try:
      self.start_server()
      self._start_namespace(chain, key)
    except BaseException:
      self.close()
      raise
    return self

  def _start_namespace(self, chain: str, key: str) -> None:
    hosts = os.path.join(self.tmp_dir, 'hosts')
    with open(hosts, 'w') as f:
      f.write('127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n'
              f'127.0.0.1 {socket.gethostname()}\n'  # jax.distributed, gloo resolve it.
              f'127.0.0.1 {" ".join(GOOGLE_HOSTS)}\n')
    argv = [sys.executable, NETNS, '--unix', self.unix_socket, '--hosts', hosts,
            '--cert', chain, '--key', key, '--plain-port', '80',
            '--plain-port', str(self.port)]
    if os.path.exists('/etc/nsswitch.conf'):
      # Names from the hosts file only: no DNS server to wait for.
      nsswitch = os.path.join(self.tmp_dir, 'nsswitch.conf')
      with open('/etc/nsswitch.conf') as src, open(nsswitch, 'w') as f:
        for line in src:
          f.write('hosts: files\n' if line.split(':')[0].strip() == 'hosts' else line)
      argv += ['--nsswitch', nsswitch]
    # As root, the namespaces need no user namespace (and jobs keep root's access to files
    # owned by other users); otherwise --map-root-user makes them possible unprivileged.
    unshare = ['unshare', '--net', '--mount'] + ([] if os.geteuid() == 0 else
                                                 ['--map-root-user'])
    log = open(self.netns_log, 'ab')
    self._holder = subprocess.Popen(_die_with_parent() + unshare + argv,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    log.close()
    try:
      _wait_for_line(self._holder, 'READY', 30, 'the namespace holder', self.netns_log)
    except RuntimeError as e:
      raise RuntimeError(
          'the GCS world could not make its network namespace: `unshare --net --mount'
          f'{"" if os.geteuid() == 0 else " --map-root-user"}` (util-linux) must be allowed '
          'for this user (unprivileged user namespaces: sysctl kernel.unprivileged_userns_'
          'clone=1 and user.max_user_namespaces > 0; in a container, a seccomp profile that '
          f'allows unshare/setns and mount). {e}') from None
    self._netns_id = os.readlink(f'/proc/{self._holder.pid}/ns/net')

  def start_server(self) -> None:
    """Starts the server (again) on the same port and data: the objects are kept."""
    if self._server is not None and self._server.poll() is None:
      return
    log = open(self.server_log, 'ab')
    argv = [sys.executable, EMULATOR, '--data-dir', self._data_dir, '--port', str(self.port),
            '--unix', self.unix_socket, '--bucket', self.bucket, '--log', self.server_log,
            *(['--log-headers'] if self.log_headers else [])]
    self._server = subprocess.Popen(_die_with_parent() + argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log)
    log.close()
    _wait_for_line(self._server, 'READY', 60, 'the GCS server', self.server_log)

  def stop_server(self, sig: int = signal.SIGKILL) -> None:
    """Stops the server as a crash would (SIGKILL by default); its data stays on disk.

    While it is down, connections to it (from the pytest process and from jobs, on every
    port) are refused or reset at once, as a dead server's.
    """
    server, self._server = self._server, None
    if server is None:
      return
    try:
      if server.poll() is None:
        server.send_signal(sig)
      try:
        server.wait(timeout=30)
      except subprocess.TimeoutExpired:  # A SIGTERM it did not heed.
        server.kill()
        server.wait()
    finally:
      if server.stdout:
        server.stdout.close()

  def close(self) -> None:
    """Kills everything the world started: jobs (with their children in the namespace), the
    namespace holder and the server. Safe to call twice, and after a failed start."""
    try:
      for proc in self._jobs:
        if proc.poll() is None:
          try:
            os.killpg(proc.pid, signal.SIGKILL)
          except ProcessLookupError:
            pass
      self._kill_namespace_processes()
      holder, self._holder = self._holder, None
      if holder is not None:
        if holder.poll() is None:
          holder.kill()
        holder.wait(timeout=30)
        for stream in (holder.stdin, holder.stdout):
          stream.close()
      for proc in self._jobs:
        try:
          proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
          pass
      self._jobs = []
    finally:
      try:
        self.stop_server()
      finally:
        if self._socket_dir:
          shutil.rmtree(self._socket_dir, ignore_errors=True)
          self._socket_dir = None

  def _kill_namespace_processes(self) -> None:
    """Whatever still runs in the world's network namespace (a job's daemon that left its
    process group, say), but never the holder itself, which close() ends after."""
    if not self._netns_id:
      return
    holder = self._holder.pid if self._holder else None
    for pid in (int(p) for p in os.listdir('/proc') if p.isdigit()):
      try:
        if pid != holder and os.readlink(f'/proc/{pid}/ns/net') == self._netns_id:
          os.kill(pid, signal.SIGKILL)
      except (OSError, ValueError):
        pass  # Gone, or not ours to see.

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.close()

  # ---------------------------------------------------------------- jobs
  def env(self, base: dict | None = None) -> dict:
    """`base` (default: this process's environment) with what a job needs in the world."""
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_ENV:
      env.pop(name, None)
    env.update({
        # TF and tensorstore: a fixed bearer token; neither looks for credentials then.
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': _TOKEN,
        # TF: do not probe the metadata server to find out whether this is GCE.
        'NO_GCE_CHECK': 'true',
        # TF's curl (and tensorstore's, Python's ssl, requests) trust the world's CA.
        'CURL_CA_BUNDLE': self.ca_bundle, 'TENSORSTORE_CA_BUNDLE': self.ca_bundle,
        'SSL_CERT_FILE': self.ca_bundle, 'REQUESTS_CA_BUNDLE': self.ca_bundle,
        # tensorstore's GCS driver (Orbax's arrays): this URL instead of storage.googleapis.com.
        'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{self.port}',
        # google-cloud-storage, should a job use it.
        'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{self.port}',
        # Metadata server lookups (TF, google-auth: HOST/IP; tensorstore: ROOT) on loopback.
        'GCE_METADATA_HOST': '127.0.0.1', 'GCE_METADATA_IP': '127.0.0.1',
        'GCE_METADATA_ROOT': '127.0.0.1',
        # No gcloud credentials file to find (an empty configuration directory).
        'CLOUDSDK_CONFIG': self._cloudsdk_config,
    })
    return env

  def command(self, argv: list[str], cwd=None) -> list[str]:
    """`argv` entered into the world's namespaces, in `cwd` (default: the current one)."""
    if self._holder is None or self._holder.poll() is not None:
      raise RuntimeError('the GCS world is not running (start() it first)')
    user = [] if os.geteuid() == 0 else ['--user', '--preserve-credentials']
    # nsenter would start in / of the mount namespace: --wd keeps the directory.
    return [*_die_with_parent(), 'nsenter', f'--target={self._holder.pid}', *user, '--net',
            '--mount', f'--wd={os.path.abspath(cwd or os.getcwd())}', '--',
            *map(os.fspath, argv)]

  def popen(self, argv: list[str], env: dict | None = None, cwd=None,
            **kwargs) -> subprocess.Popen:
    """subprocess.Popen of `argv` in the world, in a process group of its own that close()
    kills. `env` defaults to self.env()."""
    proc = subprocess.Popen(self.command(argv, cwd), env=self.env() if env is None else env,
                            start_new_session=True, **kwargs)
    self._jobs.append(proc)
    return proc

  def run(self, argv: list[str], env: dict | None = None, timeout: float = 300,
          check: bool = True, cwd=None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of `argv` in the world; output captured as text unless told otherwise.

    On timeout the job's whole process group is killed, then subprocess.TimeoutExpired.
    With check, a non-zero exit raises JobFailed with the end of the job's output.
    """
    if not any(k in kwargs for k in ('stdout', 'stderr', 'capture_output')):
      kwargs['capture_output'] = True
    if kwargs.pop('capture_output', False):
      kwargs['stdout'] = kwargs['stderr'] = subprocess.PIPE
    kwargs.setdefault('text', True)
    proc = self.popen(argv, env=env, cwd=cwd, **kwargs)
    try:
      stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      stdout, stderr = proc.communicate()
      raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    finally:
      if proc.poll() is not None and proc in self._jobs:
        self._jobs.remove(proc)
    if check and proc.returncode:
      raise JobFailed(proc.returncode, proc.args, stdout, stderr)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

  # ---------------------------------------------------------------- the bucket, directly
  def url(self, path: str = '') -> str:
    """gs://<bucket>/<path>: what a job passes to its client."""
    return f'gs://{self.bucket}/{path.lstrip("/")}'

  def _request(self, method: str, path: str, body: bytes | None = None,
               headers: dict | None = None) -> tuple[int, bytes]:
    # Plain HTTP to the server's JSON API on the host's loopback: no client library, so
    # the assertions do not depend on what they check.
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=60)
    try:
      conn.request(method, path, body=body, headers=headers or {})
      response = conn.getresponse()
      return response.status, response.read()
    finally:
      conn.close()

  def _object_path(self, name: str) -> str:
    return f'/b/{self.bucket}/o/{urllib.parse.quote(name, safe="")}'

  def list(self, prefix: str = '') -> list[str]:
    """The names of the bucket's objects that start with `prefix`, sorted."""
    names, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      status, body = self._request(
          'GET', f'/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}')
      if status != 200:
        raise RuntimeError(f'listing gs://{self.bucket}/{prefix}: HTTP {status}: {body[:500]}')
      page = json.loads(body)
      names += [item['name'] for item in page.get('items') or []]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def stat(self, name: str) -> dict:
    """The object's resource (size, generation, md5Hash...); FileNotFoundError if absent."""
    status, body = self._request('GET', '/storage/v1' + self._object_path(name))
    if status == 404:
      raise FileNotFoundError(self.url(name))
    if status != 200:
      raise RuntimeError(f'stat {self.url(name)}: HTTP {status}: {body[:500]}')
    return json.loads(body)

  def read(self, name: str) -> bytes:
    """The object's bytes; FileNotFoundError if absent."""
    status, body = self._request('GET', '/download/storage/v1' + self._object_path(name) +
                                 '?alt=media')
    if status == 404:
      raise FileNotFoundError(self.url(name))
    if status != 200:
      raise RuntimeError(f'reading {self.url(name)}: HTTP {status}: {body[:500]}')
    return body

  def write(self, name: str, data: bytes) -> None:
    """Creates or replaces the object."""
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    status, body = self._request('POST', f'/upload/storage/v1/b/{self.bucket}/o?{query}',
                                 body=bytes(data),
                                 headers={'Content-Type': 'application/octet-stream'})
    if status != 200:
      raise RuntimeError(f'writing {self.url(name)}: HTTP {status}: {body[:500]}')

  def delete(self, name: str) -> None:
    """Deletes the object; FileNotFoundError if absent."""
    status, body = self._request('DELETE', '/storage/v1' + self._object_path(name))
    if status == 404:
      raise FileNotFoundError(self.url(name))
    if status not in (200, 204):
      raise RuntimeError(f'deleting {self.url(name)}: HTTP {status}: {body[:500]}')


@pytest.fixture(scope='module')
def gcs_world(tmp_path_factory):
  """A started GcsWorld for the test module (bucket 'bkt'), closed after its last test."""
  world = GcsWorld(tmp_path_factory.mktemp('gcs_world'))
  world.start()
  try:
    yield world
  finally:
    world.close()
