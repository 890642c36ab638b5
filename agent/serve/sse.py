"""Server-sent events over HTTP/1.1 chunked transfer encoding, and telling a client has gone.

A stream is one 200 response whose body is ``data: <json>\\n\\n`` events, each written (and so
sent, TCP_NODELAY) as it is produced; the chunked framing keeps the connection reusable after
the last event. A write that fails or times out (serve.request_timeout_s: a client that stops
reading) marks the stream dead, and the generation behind it is cancelled.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
from io import BufferedIOBase
from typing import Any


def peer_gone(sock: socket.socket) -> bool:
    """True when the client has closed its end (EOF or reset) without a request pending.

    A client of these endpoints sends nothing while it waits for the answer, so readable with
    no bytes means it went away; bytes (a pipelined request) are left in place.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class SseStream:
    """Writes the head once, then one chunk per event; ``alive`` turns False on a failed write."""

    def __init__(self, sock: socket.socket, wfile: BufferedIOBase, timeout_s: float) -> None:
        self.sock, self.wfile, self.timeout_s = sock, wfile, timeout_s
        self.alive = True
        self.started = False

    def start(self, close: bool) -> None:
        head = [
            "HTTP/1.1 200 OK",
            "Content-Type: text/event-stream; charset=utf-8",
            "Cache-Control: no-cache",
            "Transfer-Encoding: chunked",
        ]
        if close:
            head.append("Connection: close")
        self.started = True
        self._write(("\r\n".join(head) + "\r\n\r\n").encode())

    def event(self, doc: dict[str, Any] | str) -> bool:
        """One ``data:`` event (a JSON object, or a literal such as ``[DONE]``)."""
        data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
        body = f"data: {data}\n\n".encode()
        return self._write(b"%x\r\n%s\r\n" % (len(body), body))

    def end(self) -> None:
        """The terminating zero-length chunk: the response is complete."""
        self._write(b"0\r\n\r\n")

    def _write(self, raw: bytes) -> bool:
        if not self.alive:
            return False
        try:
            self.sock.settimeout(self.timeout_s)
            self.wfile.write(raw)
            with contextlib.suppress(AttributeError):
                self.wfile.flush()
        except (OSError, ValueError):  # gone, reset, or stopped reading past the timeout
            self.alive = False
        return self.alive
