"""Multi-host start-up: `initialize_distributed` joins this process to the others of a run before JAX is used.

On Cloud TPU (and under SLURM and similar) JAX finds its peers from the environment; elsewhere every process is given
the coordinator's HOST:PORT, the process count and its own id. Those processes first meet over a plain TCP socket, so a
peer that never starts, or a wrong address, becomes a RuntimeError naming the coordinator and the missing process ids
after a timeout, instead of a hang or a fatal abort inside jax.distributed.initialize.
"""
from __future__ import annotations

import socket
import time
from typing import Any, Optional

import jax


def _split_address(coordinator: str) -> tuple[str, int]:
  host, sep, port = coordinator.rpartition(':')
  if not sep or not port.isdigit():
    raise ValueError(f'--coordinator={coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476.')
  return host.strip('[]'), int(port)


def _rendezvous(coordinator: str, num_processes: int, process_id: int, timeout_s: float):
  """Waits until every process has reached the coordinator's port, or raises RuntimeError saying who is missing.

  jax.distributed.initialize aborts the whole interpreter (a C++ fatal error, no Python exception) when a peer never
  shows up, so the processes first meet over a plain TCP socket on the coordinator's port: process 0 listens and
  answers 'go' once all peers have connected, then frees the port for JAX's own service. Peers close first, so the
  port is not left in TIME_WAIT on the coordinator.
  """
  host, port = _split_address(coordinator)
  deadline = time.monotonic() + timeout_s
  hint = ('Start every process with the same --coordinator and --num_processes, each with its own --process_id '
          '(0 on the coordinator host), and check that the port is reachable.')
  if process_id == 0:
    server = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      server.bind(('', port))
    except OSError as e:
      server.close()
      raise RuntimeError(f'coordinator {coordinator}: cannot listen on port {port} ({e}); pick a free port.') from e
    server.listen(num_processes)
    peers: dict[int, socket.socket] = {}
    try:
      while len(peers) < num_processes - 1:
        left = deadline - time.monotonic()
        if left <= 0:
          missing = sorted(set(range(1, num_processes)) - set(peers))
          raise RuntimeError(f'coordinator {coordinator}: only {len(peers) + 1} of {num_processes} processes joined '
                             f'within {timeout_s:g}s; process id(s) {missing} never connected. {hint}')
        server.settimeout(min(left, 1.0))
        try:
          conn, _ = server.accept()
        except socket.timeout:
          continue
        conn.settimeout(max(deadline - time.monotonic(), 1.0))
        try:
          peers[int(conn.recv(16).decode().strip())] = conn
        except (OSError, ValueError):
          conn.close()
      for conn in peers.values():
        conn.sendall(b'go\n')
      for conn in peers.values():  # wait for each peer to close its end first
        try:
          conn.settimeout(max(deadline - time.monotonic(), 1.0))
          conn.recv(16)
        except OSError:
          pass
    finally:
      for conn in peers.values():
        conn.close()
      server.close()
    return
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise RuntimeError(f'process {process_id}: the coordinator {coordinator} (process 0) could not be reached '
                           f'within {timeout_s:g}s ({e}). {hint}') from e
      time.sleep(0.2)
  with conn:
    conn.sendall(f'{process_id}\n'.encode())
    conn.settimeout(max(deadline - time.monotonic(), 0.1))
    try:
      reply = conn.recv(16)
    except OSError:
      reply = b''
    if not reply.startswith(b'go'):
      raise RuntimeError(f'process {process_id}: reached the coordinator {coordinator}, but not all {num_processes} '
                         f'processes joined within {timeout_s:g}s. {hint}')


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, timeout_s: int = 300):
  """jax.distributed.initialize from flags, or with no arguments from the environment (Cloud TPU, SLURM, ...).

  With a coordinator, the processes first meet over TCP (see _rendezvous), so a peer that never starts, or a wrong
  address, is a RuntimeError naming the coordinator and the missing processes after `timeout_s` instead of a hang or
  a fatal abort inside JAX.
  """
  kwargs: dict[str, Any] = {}
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError(f'--coordinator={coordinator!r} needs --num_processes and --process_id as well.')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, {num_processes}) (--num_processes).')
    _rendezvous(coordinator, num_processes, process_id, timeout_s)
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  elif num_processes is not None or process_id is not None:
    raise ValueError('--num_processes/--process_id need --coordinator=HOST:PORT (address of process 0).')
  jax.distributed.initialize(initialization_timeout=int(timeout_s), **kwargs)
