"""What the endpoint's clients may hold at once: connection slots and body bytes being read.

Both exist so that abusive clients cost a bounded share of the device (docs/protocol.md,
"Local inference endpoint"):

* Slow clients. A deadline alone does not stop clients that connect and send nothing (or a byte
  every few seconds) from holding every slot: they reconnect as fast as they are timed out. So
  when every slot is taken, a new connection evicts the oldest one that is not running an
  inference (idle keep-alive, or a request whose head or body has not fully arrived). A real
  client's request arrives within milliseconds of connecting, so it is never the oldest unfinished
  one for long; a slow client always is. No minimum body rate is enforced: eviction already bounds
  what a slow body costs, and a rate would only fail a real client on a slow link. When every
  slot is running an inference, a new connection gets 503.
* Large bodies. Bodies being read and parsed hold ``max_body_bytes_in_flight`` bytes at most
  together (bodies up to 64 KiB are not counted, so small requests never wait on large ones);
  beyond it a request gets 503 with Retry-After. Parsing a JSON body costs several times its size
  (a Python float per number), so after a large request the heap is trimmed back to the OS.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from agent.config import ServeConfig
from agent.service import trim_memory

# Bodies up to this size are not counted against max_body_bytes_in_flight.
SMALL_BODY = 64 * 1024
# After a request with a body at least this large, the heap is trimmed (malloc_trim).
TRIM_AFTER_BYTES = 1024 * 1024

_BUSY_BODY = b'{"error":"too many connections open"}'
# The answer to a connection refused because every slot is running a request.
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
_EVICTED_BODY = b'{"error":"request too slow: every connection slot is taken"}'
_EVICTED = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_EVICTED_BODY), _EVICTED_BODY)
)


class Conn:
    """One open connection, as the endpoint's eviction sees it."""

    __slots__ = ("busy", "evicted", "since", "sock", "started")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.since = time.monotonic()  # when it began waiting for its current request
        self.busy = False  # running a request whose body has arrived: never evicted
        self.evicted = False
        self.started = False  # bytes of the current request have arrived


class ConnSlots:
    """``max_connections`` slots; a new connection takes a free one or evicts a slow client."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, Conn] = {}  # those holding a slot
        self.evicted = 0

    def conn_of(self, sock: socket.socket) -> Conn:
        with self._lock:
            c = self._conns.get(sock)
        return c if c is not None else Conn(sock)

    def idle(self, c: Conn) -> None:
        """The connection waits for its next request: evictable, the newest of them."""
        with self._lock:
            c.busy, c.started, c.since = False, False, time.monotonic()

    def start_work(self, c: Conn) -> bool:
        """The request has arrived: not evictable until it is answered; False if evicted first."""
        with self._lock:
            if c.evicted:
                return False
            c.busy = True
            return True

    def admit(self, sock: socket.socket) -> bool:
        """A slot for a new connection: free, or taken from the oldest one not running a request."""
        victim = None
        with self._lock:
            if len(self._conns) >= self.cfg.max_connections:
                idle = [c for c in self._conns.values() if not c.busy]
                if not idle:
                    return False
                victim = min(idle, key=lambda c: c.since)
                victim.evicted = True
                del self._conns[victim.sock]
                self.evicted += 1
            self._conns[sock] = Conn(sock)
        if victim is not None:
            # A request partly received is told why; an idle keep-alive connection is just closed
            # (an unasked-for response could be read as the answer to its next request).
            with contextlib.suppress(OSError):
                if victim.started:
                    victim.sock.send(_EVICTED, socket.MSG_DONTWAIT)
                victim.sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns; it ends
        return True

    def leave(self, sock: socket.socket) -> None:
        with self._lock:
            c = self._conns.get(sock)
            if c is not None and not c.evicted:
                del self._conns[sock]


class BodyBudget:
    """Bytes of large bodies being read and parsed, at most ``max_body_bytes_in_flight``."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._inflight = 0  # body bytes reserved
        self.refused = 0

    def reserve(self, n: int) -> bool:
        if n <= SMALL_BODY:
            return True
        with self._lock:
            if self._inflight + n > self.cfg.body_budget:
                self.refused += 1
                return False
            self._inflight += n
            return True

    def release(self, n: int) -> None:
        if n <= SMALL_BODY:
            return
        with self._lock:
            self._inflight -= n
            last = self._inflight == 0
        if last and n >= TRIM_AFTER_BYTES:
            trim_memory()  # parsing left a peak of freed heap: give it back to the OS
