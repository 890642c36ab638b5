"""The endpoint's HTTP/1.1 mechanics: per-request deadlines, bounded body reads and responses.

The endpoint's routes build on this. Every request (waiting for it, its head and its body) has
one deadline, so a client sending a byte at a time holds its thread for a bounded time;
responses are written in one send (no Nagle/delayed-ACK stall).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from agent.serve.genroutes import error_doc
from agent.serve.limits import Conn
from agent.serve.tensors import RequestError

if TYPE_CHECKING:
    from agent.serve.http import Endpoint

log = logging.getLogger(__name__)

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once a request's deadline has passed, however slowly bytes trickle
    in: a per-read timeout alone lets a client that sends one byte at a time hold a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self.deadline: float | None = None
        self.conn: Conn | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int | None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request took too long")
            self._sock.settimeout(left)
        n = self._raw.readinto(b)
        if n and self.conn is not None:
            self.conn.started = True
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class RequestHandler(BaseHTTPRequestHandler):
    """One connection's requests: its slot, the body reading and the responses the routes use."""

    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-agent"
    endpoint: Endpoint  # set on the subclass made per server
    _body_read = False  # the current request's body has been read (or discarded)

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()
        self._reader = _DeadlineReader(self.connection)
        self._reader.conn = self._conn = self.endpoint.slots.conn_of(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """Each request (waiting for it, its head and its body) gets request_timeout_s in all."""
        self._reader.deadline = time.monotonic() + self.endpoint.cfg.request_timeout_s
        self.endpoint.slots.idle(self._conn)
        super().handle_one_request()
        if self._conn.evicted:
            self.close_connection = True

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # -- responses --------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        header_len: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        if self._conn.evicted:  # its socket is shut: nothing can be sent
            self.close_connection = True
            return
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ]
        if header_len is not None:
            head.append(f"Inference-Header-Content-Length: {header_len}")
        if retry_after is not None:
            head.append(f"Retry-After: {retry_after}")
        if self.close_connection:
            head.append("Connection: close")
        self.connection.settimeout(
            self.endpoint.cfg.request_timeout_s
        )  # reads may have shortened it
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def _json(self, status: int, doc: dict[str, Any], retry_after: int | None = None) -> None:
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        self._send(status, body, retry_after=retry_after)

    def _error(self, status: int, message: str, retry_after: int | None = None) -> None:
        self._json(status, error_doc(self.path, status, message), retry_after)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long) as protocol error JSON."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._error(
                code if code in REASONS else 400, message or REASONS.get(code, "bad request")
            )

    # -- the request's body ------------------------------------------------------------------
    def _start_work(self) -> None:
        """The request has fully arrived: from here on its connection is not evicted."""
        if not self.endpoint.slots.start_work(self._conn):
            self.close_connection = True
            raise RequestError(503, "connection evicted")  # not sent: its socket is shut

    def _read_body(self) -> bytearray:
        """The body, read into one buffer of Content-Length bytes (no growing copies); the caller
        holds a reservation of ``len`` bytes of max_body_bytes_in_flight for it."""
        n = self._content_length()
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:  # the reader enforces the request's deadline (set in handle_one_request)
                k = self.rfile.readinto1(view[got : min(n, got + (1 << 20))])
            except TimeoutError:
                self.close_connection = True
                raise RequestError(408, "request body took too long") from None
            except OSError:
                self.close_connection = True
                raise RequestError(400, "connection lost while reading the body") from None
            if not k:
                self.close_connection = True
                raise RequestError(400, "body shorter than Content-Length")
            got += k
        view.release()
        self._body_read = True
        return buf

    def _discard_body(self, n: int) -> None:
        """Read and drop ``n`` body bytes in small pieces (constant memory, within the request's
        deadline); the connection stays usable. Closing with the body unread would reset it, and
        a client still sending would never see the answer."""
        left, scratch = n, bytearray(64 * 1024)
        while left > 0:
            try:
                k = self.rfile.readinto1(memoryview(scratch)[: min(left, len(scratch))])
            except OSError:  # TimeoutError included: give up on the connection
                k = 0
            if not k:
                self.close_connection = True
                return
            left -= k
        self._body_read = True

    def _content_length(self) -> int:
        cl = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not supported: send Content-Length")
        if cl is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length is required")
        try:
            n = int(cl)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "Content-Length is not a number") from None
        limit = self.endpoint.cfg.max_body_bytes
        if n > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(
                413, f"body of {n} bytes exceeds the {limit} allowed (serve.max_body_bytes)"
            )
        return n
