"""The step channel: one TCP connection from the replica to each expert actor that carries the steps
and the releases, in place of one Ray actor task per step.

A Ray actor call costs the replica ~0.6 ms of CPU to submit and the actor ~0.4-0.5 ms to receive and
answer, with ~1 ms round trip (a decode step's 16 items, measured on 2 CPUs; docs/benchmarks.md). On a
small CPU machine that work preempts the actor's compute threads every step. Over this channel a step
is one pickled frame each way: ~0.08 ms of replica CPU, ~0.05 ms of actor CPU, ~0.13 ms round trip.

What it keeps from the actor-task path:
- **Order.** Frames run in the order sent, one at a time, on one thread of the actor (as tasks of one
  caller did), so consecutive steps run back to back and a release never overtakes a step. The actor's
  other methods that touch the runner hold the same lock (``ExpertWorker``).
- **Failure.** A step that raises answers with the exception; a dead actor closes the connection and
  every step in flight on it fails at once (``ChannelClosed``). ``drop(conn_id)`` (sent over Ray's
  control group) makes the actor answer the steps still queued on that connection without running
  them, as ``ray.cancel`` did; a later connection is not affected.
- **Trust.** The actor listens on its node's address; a connection is served only after it sends the
  random token the actor handed out through Ray (which authenticates its own callers). Nothing is
  unpickled before that.

Frames: a 9-byte header (kind, payload length) then a pickle. Replica -> actor: ``STEP`` (a list of
``StepItem``), ``RELEASE`` (a list of sequence ids, no answer). Actor -> replica, one per ``STEP``:
``OK`` (the step's result), ``ERR`` (the exception it raised), ``DROPPED`` (not run: dropped).
"""

import asyncio
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

STEP, RELEASE = 1, 2
OK, ERR, DROPPED = 1, 2, 3
_HEADER = struct.Struct("!BQ")
_TOKEN_BYTES = 16
_CONN_ID_BYTES = 8


class ChannelClosed(ConnectionError):
    """The connection to an actor closed (its process died, or the replica closed it) with steps in flight."""


class StepDropped(RuntimeError):
    """The actor did not run this step: the steps queued behind a failed one are dropped."""


def _frame(kind: int, obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(kind, len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class ChannelServer:
    """The actor's end: a listening socket and one thread that serves one connection at a time (the
    replica reconnects after a group change; the new connection is served once the old one closes).
    ``step(items)`` and ``release(ids)`` run on that thread, under ``lock``."""

    def __init__(self, step: Callable[[list], Any], release: Callable[[list], None], lock: threading.RLock,
                 host: str, name: str = "step-channel"):
        self._step, self._release, self._lock = step, release, lock
        self.token = secrets.token_bytes(_TOKEN_BYTES)
        self._sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address = (host, self._sock.getsockname()[1])
        self._conn_id = b""  # the connection being served (sent by the client after the token)
        self._dropping = False
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def drop(self, conn_id: bytes) -> None:
        """Answer the steps queued on connection ``conn_id`` ``DROPPED`` instead of running them (the
        one running finishes); nothing when another connection is served by now."""
        if conn_id == self._conn_id:
            self._dropping = True

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(10.0)  # the token comes first, at once
                    token = _recv_exactly(conn, _TOKEN_BYTES)
                    if token is None or not hmac.compare_digest(token, self.token):
                        log.warning("step channel: refused a connection from %s:%d (wrong token)", *peer[:2])
                        continue
                    conn_id = _recv_exactly(conn, _CONN_ID_BYTES)
                    if conn_id is None:
                        continue
                    conn.settimeout(None)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._dropping = False
                    self._conn_id = conn_id
                    self._serve_connection(conn)
                except OSError as e:  # the replica went away mid-frame
                    log.info("step channel: connection from %s:%d ended: %s", peer[0], peer[1], e)

    def _serve_connection(self, conn: socket.socket) -> None:
        while True:
            head = _recv_exactly(conn, _HEADER.size)
            if head is None:
                return
            kind, n = _HEADER.unpack(head)
            body = _recv_exactly(conn, n)
            if body is None:
                return
            if kind == RELEASE:
                try:
                    with self._lock:
                        self._release(pickle.loads(body))
                except Exception:
                    log.exception("step channel: release failed")
                continue
            if kind != STEP:
                raise OSError(f"unknown frame kind {kind}")
            if self._dropping:
                conn.sendall(_frame(DROPPED, None))
                continue
            try:
                with self._lock:
                    reply = _frame(OK, self._step(pickle.loads(body)))
            except Exception as e:
                reply = _error_frame(e)
            conn.sendall(reply)


def _error_frame(e: BaseException) -> bytes:
    try:
        return _frame(ERR, e)
    except Exception:  # an exception that does not pickle: its type and text
        return _frame(ERR, RuntimeError(f"{type(e).__name__}: {e}"))


class ChannelClient:
    """The replica's end of one actor's channel, on the replica's event loop: ``submit`` sends a step
    and returns a future of its result (futures resolve in the order sent); ``release`` sends sequence
    ids to free. Both are plain calls: frames are written at once, what the socket does not take is
    flushed when it becomes writable. Connects in the constructor (blocking, bounded)."""

    def __init__(self, address: tuple[str, int], token: bytes, rank: int, connect_timeout_s: float = 10.0):
        self.rank = rank
        self.conn_id = secrets.token_bytes(_CONN_ID_BYTES)  # names this connection in ``ChannelServer.drop``
        self._sock = socket.create_connection(tuple(address), timeout=connect_timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(token + self.conn_id)
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[asyncio.Future] = deque()
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._closed: BaseException | None = None

    def submit(self, items: list) -> asyncio.Future:
        fut = self._attach().create_future()
        if self._closed is not None:
            fut.set_exception(self._closed)
            return fut
        self._pending.append(fut)
        self._write(_frame(STEP, items))
        return fut

    def release(self, seq_ids: list[str]) -> None:
        if self._closed is None:
            self._attach()
            self._write(_frame(RELEASE, list(seq_ids)))

    def close(self, why: str = "closed by the replica") -> None:
        if self._closed is None:
            self._fail(ChannelClosed(f"step channel to rank {self.rank}: {why}"))

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def _attach(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        return self._loop

    def _write(self, data: bytes) -> None:
        if self._outbuf:  # earlier frames still waiting: keep the order
            self._outbuf += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            self._fail(ChannelClosed(f"step channel to rank {self.rank}: {e}"))
            return
        if sent < len(data):
            self._outbuf += data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._outbuf)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(ChannelClosed(f"step channel to rank {self.rank}: {e}"))
            return
        del self._outbuf[:sent]
        if not self._outbuf:
            self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(ChannelClosed(f"step channel to rank {self.rank}: {e}"))
            return
        if not data:
            self._fail(ChannelClosed(f"step channel to rank {self.rank}: the actor closed the connection"))
            return
        self._inbuf += data
        while len(self._inbuf) >= _HEADER.size:
            kind, n = _HEADER.unpack_from(self._inbuf)
            if len(self._inbuf) < _HEADER.size + n:
                break
            body = bytes(self._inbuf[_HEADER.size:_HEADER.size + n])
            del self._inbuf[:_HEADER.size + n]
            if not self._pending:
                self._fail(ChannelClosed(f"step channel to rank {self.rank}: an answer no step waits for"))
                return
            fut = self._pending.popleft()
            if fut.done():  # cancelled by its caller
                continue
            try:
                value = pickle.loads(body)
            except Exception as e:
                fut.set_exception(RuntimeError(f"rank {self.rank}'s step answer did not unpickle: {e}"))
                continue
            if kind == OK:
                fut.set_result(value)
            elif kind == ERR:
                fut.set_exception(value)
            else:
                fut.set_exception(StepDropped(f"rank {self.rank} dropped a step queued behind a failed one"))

    def _fail(self, err: BaseException) -> None:
        self._closed = err
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            if self._outbuf:
                self._loop.remove_writer(self._sock.fileno())
        self._outbuf.clear()
        try:
            self._sock.close()
        except OSError:
            pass
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)
