"""The endpoint's routes: v2 server and model metadata, health, tensor inference and feedback.

Requests are routed here by path; text-generation routes (v2 generate, OpenAI chat completions)
are mixed in from agent/serve/genroutes.py, the HTTP mechanics from agent/serve/handler.py.
A ``RequestError`` anywhere in a route becomes its error response. JSON has no NaN or Infinity,
so an output holding one is refused with 500 and a reason that says to ask for it as binary data.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from agent import __version__
from agent.serve.genroutes import GenerateRoutes, not_tensors
from agent.serve.handler import RequestHandler
from agent.serve.limits import SMALL_BODY
from agent.serve.tensors import (
    RequestError,
    check_label,
    encode_response,
    parse_infer,
    spec_json,
)

PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}
# Requests that carry a body: POST; the rest are GET.
_POSTS = (["infer"], ["feedback"], ["generate"], ["generate_stream"])


class Handler(GenerateRoutes, RequestHandler):
    """The endpoint's requests, routed; the routes for text generation are GenerateRoutes'."""

    _infer_route = False  # the current request is an /infer: its 500s count as inference errors

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
