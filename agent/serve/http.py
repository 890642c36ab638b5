"""The local inference endpoint: Open Inference Protocol v2 REST (KServe / Triton) on stdlib http.server.

Text-generation models are served on the same connections, slots and budgets by the routes in
agent/serve/genroutes.py (v2 generate extension, OpenAI chat completions).

One thread per connection (keep-alive), at most ``max_connections`` at once; every socket has
a timeout and a request a deadline, so a slow or silent client only holds its own thread for a
bounded time. Responses are written in one send (no Nagle/delayed-ACK stall).

Abuse (docs/protocol.md, "Local inference endpoint"): slow clients are evicted from connection
slots and large bodies share a budget (agent/serve/limits.py). JSON has no NaN or Infinity, so
an output holding one is refused with 500 and a reason that says to ask for it as binary data
(which carries IEEE floats as they are).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socketserver
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent import __version__
from agent.config import ServeConfig
from agent.errors import ConfigError
from agent.serve.generate import GenGate
from agent.serve.genroutes import GenerateRoutes, not_tensors
from agent.serve.handler import RequestHandler
from agent.serve.holder import Loaded, SessionHolder
from agent.serve.limits import BUSY, SMALL_BODY, BodyBudget, ConnSlots
from agent.serve.tensors import (
    RequestError,
    check_label,
    encode_response,
    parse_infer,
    spec_json,
)
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder

if TYPE_CHECKING:
    from agent.monitor.capture import Capture

log = logging.getLogger(__name__)

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}
# Requests that carry a body: POST; the rest are GET.
_POSTS = (["infer"], ["feedback"], ["generate"], ["generate_stream"])


class _Handler(GenerateRoutes, RequestHandler):
    # -- methods ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        self._infer_route = self._body_read = False
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if method != "POST" and self.headers.get("Content-Length", "0") not in ("", "0"):
            self.close_connection = True  # a GET with a body: it is not read, so no reuse
        try:
            self._dispatch(method, parts)
        except RequestError as exc:
            if not self._body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
                self.close_connection = True  # a body left unread: the connection cannot be reused
            # Telemetry's errors count inferences the runtime failed (500), not a client's bad
            # request or "no model yet" (503): a rollout's canary gate reads them as model faults.
            if self._infer_route and exc.status == 500:
                self.endpoint.recorder.error()
            self._error(exc.status, exc.message, exc.retry_after)

    _infer_route = False

    def _dispatch(self, method: str, parts: list[str]) -> None:
        ep = self.endpoint
        if parts[:1] == ["v1"]:
            self._v1(method, parts)
            return
        if parts[:1] != ["v2"]:
            raise RequestError(404, f"no such endpoint: {self.path[:200]}")
        rest = parts[1:]
        want = "POST" if rest[-1:] in _POSTS else "GET"
        if method != want:
            self.close_connection = True
            raise RequestError(405, f"{method} is not allowed here (use {want})")
        if rest[-1:] not in _POSTS:
            self._start_work()
        if not rest:
            self._json(
                200,
                {
                    "name": "edgefleet-agent",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                },
            )
            return
        if rest == ["health", "live"]:
            self._json(200, {"live": True})
            return
        if rest == ["health", "ready"]:
            ready = ep.holder.current is not None
            self._json(200 if ready else 503, {"ready": ready})
            return
        if rest[0] != "models" or len(rest) < 2:
            raise RequestError(404, f"no such endpoint: {self.path[:200]}")
        name, version, tail = rest[1], None, rest[2:]
        if tail[:1] == ["versions"]:
            if len(tail) < 2:
                raise RequestError(404, f"no such endpoint: {self.path[:200]}")
            version, tail = tail[1], tail[2:]
        if tail == ["infer"]:
            self._infer_route = True
            self._infer(name, version)
        elif tail == ["feedback"]:
            self._feedback(name, version)
        elif tail in (["generate"], ["generate_stream"]):
            self._v2_generate(name, version, tail == ["generate_stream"])
        elif tail == []:
            m = ep.find(name, version)
            self._json(
                200,
                {
                    "name": m.name,
                    "versions": [m.version],
                    "platform": PLATFORMS.get(m.runtime, m.runtime),
                    "inputs": [spec_json(s) for s in m.inputs],
                    "outputs": [spec_json(s) for s in m.outputs],
                },
            )
        elif tail == ["ready"]:
            m = ep.find(name, version)
            self._json(200, {"name": m.name, "ready": True})
        else:
            raise RequestError(404, f"no such endpoint: {self.path[:200]}")

    def _feedback(self, name: str, version: str | None) -> None:
        """{"id": an earlier request's id, "label": ...}: the label is captured with that
        request's sample while it is among the last ones kept (agent.monitor.capture)."""
        n = self._content_length()
        if n > SMALL_BODY:
            self.close_connection = True
            raise RequestError(413, f"a feedback body is at most {SMALL_BODY} bytes")
        body = self._read_body()
        self._start_work()
        self.endpoint.find(name, version)
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "request body is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or "label" not in doc:
            raise RequestError(400, 'feedback is {"id": "<request id>", "label": ...}')
        label = check_label(doc["label"])
        cap = self.endpoint.capture
        if label is None or cap is None or not cap.feedback(doc["id"], label):
            raise RequestError(404, f"no recent request with id '{doc['id'][:100]}' is kept")
        self._json(200, {"id": doc["id"], "accepted": True})

    def _infer(self, name: str, version: str | None) -> None:
        ep = self.endpoint
        n = self._content_length()
        if not ep.bodies.reserve(n):
            self._discard_body(n)  # so the client, still sending, can read the answer
            raise RequestError(
                503,
                f"too many large request bodies at once (serve.max_body_bytes_in_flight = "
                f"{ep.cfg.body_budget}): try again shortly",
                retry_after=1,
            )
        try:
            self._infer_reserved(name, version)
        finally:
            ep.bodies.release(n)

    def _infer_reserved(self, name: str, version: str | None) -> None:
        ep = self.endpoint
        body = self._read_body()
        self._start_work()
        hl = self.headers.get("Inference-Header-Content-Length")
        try:
            header_len = None if hl is None else int(hl)
        except ValueError:
            raise RequestError(400, "Inference-Header-Content-Length is not a number") from None
        holder = ep.holder
        loaded = holder.acquire()
        if loaded is None:
            raise RequestError(503, "no model is active on this device")
        try:
            ep.check(loaded, name, version)
            if loaded.generator is not None:
                raise not_tensors(loaded)
            req = parse_infer(body, header_len, loaded.inputs, loaded.outputs)
            del body  # the parsed tensors are what is needed from here
            t0 = time.perf_counter()
            try:
                result = loaded.session.infer(req.feeds)
            except Exception as exc:  # a runtime's own error types
                raise RequestError(500, f"inference failed: {type(exc).__name__}: {exc}") from None
            ms = (time.perf_counter() - t0) * 1000.0
            if loaded.monitor is not None:
                loaded.monitor.offer(req.feeds, result, ms / 1000.0)
            if ep.capture is not None:
                ep.capture.offer(loaded, req.feeds, result, req.id, req.label)
            out, header_len = encode_response(loaded.name, loaded.version, req, result)
        finally:
            holder.release(loaded)
        ep.recorder.record(ms)
        self._send(
            200,
            out,
            "application/json" if header_len is None else "application/octet-stream",
            header_len,
        )


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
            "Handler", (_Handler,), {"endpoint": self, "timeout": self.cfg.request_timeout_s}
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
