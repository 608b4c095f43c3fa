"""The holder of the tests' network and mount namespace, and the relays to the GCS server.

tests/gcs_world.py starts this program under `unshare --net --mount` (and --map-root-user
when not root); it lives as long as the world. Jobs are entered into its namespaces with
nsenter. Inside, the only network interface is a loopback, brought up here, so nothing a job
does can leave the machine; /etc/hosts is replaced (a bind mount seen only in this mount
namespace) so that storage.googleapis.com and the other Google names are 127.0.0.1, where
this process listens:

  443   TLS with the world's certificate (TF's client calls https://storage.googleapis.com
        and https://www.googleapis.com), then plain HTTP to the server;
  80    plain HTTP (the emulator's resumable-upload URLs are http://www.googleapis.com/...,
        and metadata.google.internal is port 80);
  PORT  plain HTTP, the port of TENSORSTORE_GCS_HTTP_URL (the server's port outside).

Each connection is relayed to the server's Unix socket, a path in the file system, which a
network namespace does not separate. When the server is down the relay resets the
connection at once, as a dead host's port would refuse it: clients fail fast and retry.
"""
import argparse
import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import ssl
import struct
import sys

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_MS_BIND = 4096


def loopback_up() -> None:
  """A new network namespace's loopback is down: up, as `ip link set lo up` (no iproute2)."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sh', b'lo', 0)
    flags = struct.unpack('16sh', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack('16sh', b'lo', flags | _IFF_UP))


def bind_mount(source: str, target: str) -> None:
  """`mount --bind source target`, in this process's (private) mount namespace."""
  libc = ctypes.CDLL(None, use_errno=True)
  if libc.mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f'mount --bind {source} {target}: {os.strerror(errno)}')


def _reset(writer: asyncio.StreamWriter) -> None:
  """Closes a client's connection with a RST, as a port nobody serves answers."""
  sock = writer.get_extra_info('socket')
  try:
    if sock is not None:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
  except OSError:
    pass
  writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                half_close: bool) -> None:
  try:
    while True:
      data = await reader.read(1 << 16)
      if not data:
        break
      writer.write(data)
      await writer.drain()
    if half_close and writer.can_write_eof():
      writer.write_eof()  # The client is done sending; the server may still answer.
    else:
      writer.close()
  except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
    writer.transport.abort()


def relay(unix_path: str):
  async def handle(client_reader, client_writer):
    try:
      server_reader, server_writer = await asyncio.open_unix_connection(unix_path)
    except OSError:  # The server is down (ECONNREFUSED) or gone (ENOENT).
      _reset(client_writer)
      return
    try:
      await asyncio.gather(_pipe(client_reader, server_writer, half_close=True),
                           _pipe(server_reader, client_writer, half_close=False))
    finally:
      client_writer.close()
      server_writer.close()
  return handle


async def serve(args) -> None:
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  tls.load_cert_chain(args.cert, args.key)
  handle = relay(args.unix)
  servers = [await asyncio.start_server(handle, '127.0.0.1', 443, ssl=tls,
                                        ssl_handshake_timeout=30)]
  for port in args.plain_port:
    servers.append(await asyncio.start_server(handle, '127.0.0.1', port))
  print('READY', flush=True)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  # The world's owner holds our stdin (a pipe): when it is gone (even killed), so is the world.
  try:
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 1024) or stop.set())
  except (OSError, ValueError):
    pass  # Not a pipe (a file, a terminal...): SIGTERM ends it.
  await stop.wait()
  for s in servers:
    s.close()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--unix', required=True, help="the GCS server's Unix socket")
  parser.add_argument('--hosts', required=True, help='the file that replaces /etc/hosts')
  parser.add_argument('--nsswitch', default='', help='the file that replaces /etc/nsswitch.conf')
  parser.add_argument('--cert', required=True, help='certificate chain (PEM) for port 443')
  parser.add_argument('--key', required=True)
  parser.add_argument('--plain-port', type=int, action='append', default=[])
  args = parser.parse_args(argv)
  loopback_up()
  bind_mount(args.hosts, '/etc/hosts')
  if args.nsswitch:
    bind_mount(args.nsswitch, '/etc/nsswitch.conf')
  asyncio.run(serve(args))


if __name__ == '__main__':
  main()
