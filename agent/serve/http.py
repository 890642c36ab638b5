"""The local inference endpoint: Open Inference Protocol v2 REST (KServe / Triton) on stdlib http.server.

``Endpoint`` listens (TCP or a Unix socket) and runs one thread per connection (keep-alive), at
most ``max_connections`` at once: slots and the body budget are in agent/serve/limits.py, the
routes in routes.py (tensors) and genroutes.py (text generation), built on handler.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socketserver
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import ServeConfig
from agent.errors import ConfigError
from agent.serve.generate import GenGate
from agent.serve.holder import Loaded, SessionHolder
from agent.serve.limits import BUSY, BodyBudget, ConnSlots
from agent.serve.routes import Handler
from agent.serve.tensors import RequestError
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder

if TYPE_CHECKING:
    from agent.monitor.capture import Capture

log = logging.getLogger(__name__)


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class Endpoint:
    """Owns the listening socket and its thread; ``start``/``stop`` from the agent's main thread."""

    def __init__(
        self,
        cfg: ServeConfig,
        holder: SessionHolder,
        recorder: LatencyRecorder,
        capture: Capture | None = None,
        gen_recorder: GenRecorder | None = None,
    ) -> None:
        self.cfg, self.holder, self.recorder, self.capture = cfg, holder, recorder, capture
        self.gen_recorder = gen_recorder if gen_recorder is not None else GenRecorder()
        self.gate = GenGate(cfg.max_generations, cfg.max_queued_generations, self.gen_recorder)
        self.slots = ConnSlots(cfg)
        self.bodies = BodyBudget(cfg)
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""

    def find(self, name: str, version: str | None) -> Loaded:
        m = self.holder.current
        if m is None:
            raise RequestError(503, "no model is active on this device")
        self.check(m, name, version)
        return m

    @staticmethod
    def check(m: Loaded, name: str, version: str | None) -> None:
        if name != m.name:
            raise RequestError(404, f"unknown model '{name[:100]}' (this device serves '{m.name}')")
        if version is not None and version != m.version:
            raise RequestError(
                404, f"version '{version[:100]}' of '{name}' is not active (active: {m.version})"
            )

    def start(self) -> None:
        handler = type(
            "Handler", (Handler,), {"endpoint": self, "timeout": self.cfg.request_timeout_s}
        )
        cfg = self.cfg
        try:
            if cfg.unix_socket is not None:
                path = Path(cfg.unix_socket)
                if path.is_socket():
                    path.unlink()  # a stale socket from a previous run
                server: socketserver.BaseServer = _UnixServer(str(path), handler)
                os.chmod(path, 0o660)
                self.address = f"unix:{path}"
            else:
                server = _TcpServer((cfg.host, cfg.port), handler)
                host, port = server.server_address[:2]
                self.address = f"http://{host!s}:{port}"
        except OSError as exc:
            where = cfg.unix_socket or f"{cfg.host}:{cfg.port}"
            raise ConfigError(f"serve: cannot listen on {where}: {exc.strerror or exc}") from None

        def process_request(request: Any, client_address: Any) -> None:
            if not self.slots.admit(request):  # every slot is running a request: answer and hang up
                with contextlib.suppress(OSError):
                    request.sendall(BUSY)
                server.shutdown_request(request)
                return
            socketserver.ThreadingMixIn.process_request(server, request, client_address)  # type: ignore[arg-type]

        def process_request_thread(request: Any, client_address: Any) -> None:
            try:
                socketserver.ThreadingMixIn.process_request_thread(server, request, client_address)  # type: ignore[arg-type]
            finally:
                self.slots.leave(request)

        def handle_error(request: Any, client_address: Any) -> None:
            exc = sys.exc_info()[1]
            if isinstance(exc, OSError):  # a client gone, or its connection evicted
                log.debug("connection ended: %s", exc)
            else:
                log.exception("error serving a request")

        server.process_request = process_request  # type: ignore[method-assign]
        server.process_request_thread = process_request_thread  # type: ignore[attr-defined]
        server.handle_error = handle_error  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 1.0}, name="serve", daemon=True
        )
        self._thread.start()
        log.info("serving the Open Inference Protocol v2 on %s", self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self.cfg.unix_socket is not None:
                Path(self.cfg.unix_socket).unlink(missing_ok=True)
            self._server = None
