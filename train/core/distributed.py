"""Multi-host start-up: `initialize_distributed` joins this process to the others of a run before JAX is used.

On Cloud TPU (and under SLURM and similar) JAX finds its peers from the environment; elsewhere every process is given
the coordinator's HOST:PORT, the process count and its own id. Those processes first meet over a plain TCP socket, so a
peer that never starts, or a wrong address, becomes a RuntimeError naming the coordinator and the missing process ids
after a timeout, instead of a hang or a fatal abort inside jax.distributed.initialize.

Once they run, `start_watchdog` keeps them watching each other (Watchdog: heartbeats over TCP to process 0, on a
thread of their own): when a process is killed, crashes or hangs mid-run, the others stop within the timeout
(train.main's --peer_timeout) with one line naming it and exit code PEER_LOST_EXIT, instead of blocking in a collective
until the backend aborts the interpreter (gloo: a C++ fatal error after about 60 s). Checkpoints stay whole: orbax only
renames a step's temporary folder once every process has written it, so a save cut short is never restored.
"""
from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

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
      _accept_peers(
          server, peers, num_processes, deadline, lambda conn: conn.recv(16).decode(), lambda missing: RuntimeError(
              f'coordinator {coordinator}: only {num_processes - len(missing)} of {num_processes} processes joined '
              f'within {timeout_s:g}s; process id(s) {missing} never connected. {hint}'))
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
                           process_id: Optional[int] = None, timeout_s: int = 300,
                           heartbeat_timeout_s: Optional[int] = None):
  """jax.distributed.initialize from flags, or with no arguments from the environment (Cloud TPU, SLURM, ...).

  With a coordinator, the processes first meet over TCP (see _rendezvous), so a peer that never starts, or a wrong
  address, is a RuntimeError naming the coordinator and the missing processes after `timeout_s` instead of a hang or
  a fatal abort inside JAX. heartbeat_timeout_s: JAX's own (C++) limit on a silent process, after which it aborts
  every process; keep it above the Watchdog's timeout so that the watchdog's one-line error comes first.
  """
  kwargs: dict[str, Any] = {}
  if heartbeat_timeout_s:
    kwargs['heartbeat_timeout_seconds'] = int(heartbeat_timeout_s)
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


# ------------------------------------------------------------------------------------------------ peer watchdog

PEER_LOST_EXIT = 75  # EX_TEMPFAIL: a peer died or hung; rerunning every process resumes from the last checkpoint
_WATCHDOG_KEY = 'lmlab/watchdog_port'


class Watchdog:
  """Heartbeats between the processes of a run, on a thread of their own; gives up on a silent peer.

  A process that is SIGKILLed, crashes or hangs leaves the others blocked inside a collective (gloo, NCCL, ICI), where
  Python cannot interrupt them, until the backend aborts the whole interpreter with a C++ fatal error a minute or more
  later. This thread notices instead: every `interval_s` it sends a heartbeat line to each peer and reads theirs, and
  a peer whose connection closes (a killed process: at once) or that stays silent for `timeout_s` (a hung host or a
  lost network) is reported by `on_lost(process_id, why)`, by default one line `error: process N ...` on stderr and
  os._exit(PEER_LOST_EXIT) (no exception can reach a main thread blocked in a collective). Process 0 talks to every
  peer and relays a loss to the others, so every survivor names the process that is gone.

  Lines on the wire: `hb`; `done` (the sender finished normally: stop watching it); `failed <text>` (the sender stops
  on an error of its own, e.g. a full disk: stop too, naming it); `lost <id> <why>` (from process 0: a peer is gone).
  """

  def __init__(self, conns: dict[int, socket.socket], process_id: int, num_processes: int, timeout_s: float, *,
               interval_s: Optional[float] = None, on_lost: Optional[Callable[[str], None]] = None):
    self.conns, self.process_id, self.num_processes = dict(conns), process_id, num_processes
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s or min(1.0, self.timeout_s / 5))
    self.on_lost = on_lost or exit_with
    self._buffers = {peer: b'' for peer in self.conns}
    self._stop = threading.Event()
    self._lost: Optional[str] = None
    self._verdict = threading.Event()
    self._thread = threading.Thread(target=self._run, name='lmlab-peer-watchdog', daemon=True)
    for conn in self.conns.values():
      conn.setblocking(False)

  def start(self) -> 'Watchdog':
    self._thread.start()
    return self

  @property
  def lost(self) -> Optional[str]:
    """The error line once a peer was given up on (None while every peer answers)."""
    return self._lost

  def wait_for_verdict(self, timeout_s: float) -> Optional[str]:
    """Waits up to timeout_s for a peer to be given up on (an error in the main thread may be a peer's death seen
    from inside a collective) -> the error line, or None."""
    self._verdict.wait(timeout_s)
    return self._lost

  def stop(self, failed: Optional[str] = None):
    """Tells the peers this process is done (or, with `failed`, that it stops on that error) and stops watching."""
    if self._stop.is_set():
      return
    self._stop.set()
    line = f'failed {" ".join(failed.split())}\n' if failed else 'done\n'
    for conn in self.conns.values():
      self._send(conn, line)
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout=2 * self.interval_s + 1)
    for conn in self.conns.values():
      conn.close()

  # ---- the thread ------------------------------------------------------------------------------------------------
  @staticmethod
  def _send(conn: socket.socket, line: str):
    try:  # never blocks: a peer that stopped reading is found by its own silence
      conn.send(line.encode(), socket.MSG_DONTWAIT | getattr(socket, 'MSG_NOSIGNAL', 0))
    except OSError:
      pass  # closed or full: its reader finds out

  def _give_up(self, peer: int, why: str, *, relayed: bool = False):
    if why.startswith('failed'):
      # An error every process meets (a bad config) reaches this one's main thread too: give it a moment to stop
      # with its own line and exit code.
      self._stop.wait(min(2.0, self.timeout_s / 4))
    if self._stop.is_set() or self._lost:
      return
    if why.startswith('failed'):
      line = (f'error: process {peer} of {self.num_processes} stopped on an error ({why[len("failed"):].strip()}); '
              f'process {self.process_id} stops too rather than wait for it forever. Fix that error, then restart all '
              f'{self.num_processes} processes with the same command: they resume from the last complete checkpoint.')
    else:
      seen = ', seen by process 0' if relayed else ''
      line = (f'error: process {peer} of {self.num_processes} stopped responding ({why}{seen}); '
              f'process {self.process_id} stops too rather than hang in a collective. Restart all {self.num_processes} '
              'processes with the same command: they resume from the last complete checkpoint (--peer_timeout sets '
              'how long a silent process is waited for).')
    if self.process_id == 0:  # the others hear only from process 0: pass the news on
      for other, conn in self.conns.items():
        if other != peer:
          self._send(conn, f'lost {peer} {why}\n')
    self._lost = line
    self._verdict.set()
    self.on_lost(line)

  def _run(self):
    selector = selectors.DefaultSelector()
    for peer, conn in self.conns.items():
      selector.register(conn, selectors.EVENT_READ, peer)
    last_heard = {peer: time.monotonic() for peer in self.conns}
    next_beat = 0.0
    try:
      while not self._stop.is_set() and last_heard:
        now = time.monotonic()
        if now >= next_beat:
          for peer in last_heard:
            self._send(self.conns[peer], 'hb\n')
          next_beat = now + self.interval_s
        wait = min(next_beat, min(last_heard.values()) + self.timeout_s) - now  # the next beat, or a deadline
        for key, _ in selector.select(timeout=max(wait, 0.0) + 1e-3):
          peer = key.data
          try:
            data = key.fileobj.recv(4096)
          except BlockingIOError:
            continue
          except OSError:
            data = b''
          if not data:  # the peer's end closed: its process exited or was killed
            self._give_up(peer, 'its connection closed: killed or crashed')
            return
          last_heard[peer] = time.monotonic()
          self._buffers[peer] += data
          *lines, self._buffers[peer] = self._buffers[peer].split(b'\n')
          for raw in lines:
            line = raw.decode(errors='replace')
            if line == 'done':
              selector.unregister(key.fileobj)
              del last_heard[peer]
              break
            if line.startswith('failed'):
              self._give_up(peer, line)
              return
            if line.startswith('lost '):
              _, gone, why = (line.split(' ', 2) + [''])[:3]
              self._give_up(int(gone), why, relayed=True)
              return
        now = time.monotonic()
        for peer, heard in list(last_heard.items()):
          if now - heard >= self.timeout_s:
            self._give_up(peer, f'no heartbeat for {self.timeout_s:g}s: hung, overloaded or unreachable')
            return
    finally:
      selector.close()


_exit_lock = threading.Lock()


def exit_with(line: str, code: int = PEER_LOST_EXIT):
  """Prints one error line and ends the process now, from any thread (a hung collective cannot be interrupted, and
  jax's exit-time shutdown would wait for the lost peer)."""
  with _exit_lock:  # the first error wins; a second caller blocks until the process is gone
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    try:
      os.write(2, (line.rstrip('\n') + '\n').encode())
    finally:
      os._exit(code)


def start_watchdog(timeout_s: float, connect_timeout_s: float = 60) -> Optional[Watchdog]:
  """After jax.distributed.initialize: connects every process to process 0 over TCP (process 0 listens on a free
  port it publishes in the coordination service's key-value store) and starts the heartbeats. None for a
  single-process run or timeout_s <= 0 (off)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  num_processes, process_id = jax.process_count(), jax.process_index()
  state = jax_distributed.global_state
  if timeout_s <= 0 or num_processes == 1 or state.client is None:
    return None
  host = (state.coordinator_address or '').rpartition(':')[0].strip('[]')
  hint = 'check that the hosts reach each other on any TCP port, or pass --peer_timeout=0 to run without the watchdog.'
  deadline = time.monotonic() + connect_timeout_s
  conns: dict[int, socket.socket] = {}
  if process_id == 0:
    dual = socket.has_dualstack_ipv6()
    server = socket.create_server(('', 0), family=socket.AF_INET6 if dual else socket.AF_INET, dualstack_ipv6=dual,
                                  backlog=num_processes)
    try:
      state.client.key_value_set(_WATCHDOG_KEY, str(server.getsockname()[1]))
      _accept_peers(
          server, conns, num_processes, deadline, _read_line, lambda missing: RuntimeError(
              f'process 0: process id(s) {missing} did not connect to the peer watchdog within '
              f'{connect_timeout_s:g}s; {hint}'))
    except BaseException:
      for conn in conns.values():
        conn.close()
      raise
    finally:
      server.close()
  else:
    try:
      port = int(state.client.blocking_key_value_get(_WATCHDOG_KEY, int(connect_timeout_s * 1000)))
      conn = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 1.0))
    except Exception as e:  # the key never came (process 0 gone) or no route to it
      raise RuntimeError(f'process {process_id}: cannot reach the peer watchdog of process 0 at {host} '
                         f'({type(e).__name__}: {" ".join(str(e).split())[:200]}); {hint}') from e
    conn.sendall(f'{process_id}\n'.encode())
    conns[0] = conn
  return Watchdog(conns, process_id, num_processes, timeout_s).start()


def _accept_peers(server: socket.socket, peers: dict, num_processes: int, deadline: float, read_id, missing_error):
  """Accepts processes 1..num_processes-1 on `server` into peers {id: connection} (filled in place, so a caller can
  close what came on an error), each naming itself by read_id(conn); at the deadline raises missing_error(the ids
  still missing)."""
  while len(peers) < num_processes - 1:
    left = deadline - time.monotonic()
    if left <= 0:
      raise missing_error(sorted(set(range(1, num_processes)) - set(peers)))
    server.settimeout(min(left, 1.0))
    try:
      conn, _ = server.accept()
    except socket.timeout:
      continue
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    try:
      peers[int(read_id(conn).strip())] = conn
    except (OSError, ValueError):
      conn.close()


def _read_line(conn: socket.socket) -> str:
  """One '\\n'-terminated line, byte by byte (so nothing after it is consumed)."""
  out = b''
  while not out.endswith(b'\n'):
    byte = conn.recv(1)
    if not byte:
      raise ValueError('closed before a line')
    out += byte
  return out.decode().strip()
