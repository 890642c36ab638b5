"""The endpoint's text-generation routes, mixed into its request handler (agent.serve.routes).

``POST /v2/models/{name}[/versions/{v}]/generate`` and ``.../generate_stream`` (Triton's generate
extension, the stream as server-sent events), ``POST /v1/chat/completions`` (OpenAI, streamed
as ``data: {chunk}`` events ending ``data: [DONE]``) and ``GET /v1/models``. A tensor model
answers 400 here, as a text-generation model does on /infer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from agent.serve.generate import GenRequest, Outcome, parse_chat, parse_v2, run
from agent.serve.sse import SseStream, peer_gone
from agent.serve.tensors import RequestError

if TYPE_CHECKING:
    import socket
    from io import BufferedIOBase

    from agent.runtime.textgen import TextGenerator
    from agent.serve.holder import Loaded
    from agent.serve.http import Endpoint


def error_doc(path: str, status: int, message: str) -> dict[str, Any]:
    """An error body: OpenAI's shape under /v1 (its clients read it), else the v2 one."""
    if not path.startswith("/v1/"):
        return {"error": message}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def not_tensors(m: Loaded) -> RequestError:
    return RequestError(
        400,
        f"model '{m.name}' generates text: POST /v2/models/{m.name}/generate "
        "or /v1/chat/completions",
    )


def not_text(m: Loaded) -> RequestError:
    return RequestError(
        400,
        f"model '{m.name}' takes tensors, not text: POST /v2/models/{m.name}/infer",
    )


class GenerateRoutes:
    """Handler methods for generation; the handler supplies the body reading and responses."""

    if TYPE_CHECKING:
        endpoint: Endpoint
        connection: socket.socket
        wfile: BufferedIOBase
        close_connection: bool

        def _content_length(self) -> int: ...
        def _read_body(self) -> bytearray: ...
        def _discard_body(self, n: int) -> None: ...
        def _start_work(self) -> None: ...
        def _json(
            self, status: int, doc: dict[str, Any], retry_after: int | None = None
        ) -> None: ...

    def _gen_body(self) -> Any:
        """The request's JSON, read within the endpoint's body budget."""
        ep, n = self.endpoint, self._content_length()
        if not ep.bodies.reserve(n):
            self._discard_body(n)
            raise RequestError(503, "too many large request bodies at once", retry_after=1)
        try:
            body = self._read_body()
        finally:
            ep.bodies.release(n)
        self._start_work()
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "request body is not valid JSON") from None

    def _v1(self, method: str, parts: list[str]) -> None:
        if parts[1:] not in (["models"], ["chat", "completions"]):
            raise RequestError(404, f"no such endpoint: {'/'.join(parts)[:200]}")
        want = "POST" if parts[1] == "chat" else "GET"
        if method != want:
            self.close_connection = True
            raise RequestError(405, f"{method} is not allowed here (use {want})")
        if want == "POST":
            self._chat()
            return
        self._start_work()
        self._v1_models()

    def _v1_models(self) -> None:
        m = self.endpoint.holder.current
        data = []
        if m is not None and m.generator is not None:
            data.append({"id": m.name, "object": "model", "created": 0, "owned_by": "edgefleet"})
        self._json(200, {"object": "list", "data": data})

    def _v2_generate(self, name: str, version: str | None, stream: bool) -> None:
        doc = self._gen_body()
        m = self.endpoint.find(name, version)
        if m.generator is None:
            raise not_text(m)
        req = parse_v2(doc, stream, self.endpoint.cfg.max_tokens_limit)
        self._generate(name, version, req, "v2")

    def _chat(self) -> None:
        doc = self._gen_body()
        m = self.endpoint.holder.current
        if m is None:
            raise RequestError(503, "no model is active on this device")
        req = parse_chat(doc, self.endpoint.cfg.max_tokens_limit)
        # "model" may be left out (one model is served, as llama.cpp's server does); a name
        # other than the active model's is a 404 that names it.
        name = doc.get("model", m.name)
        if not isinstance(name, str):
            raise RequestError(400, '"model" must be a string (GET /v1/models lists them)')
        self.endpoint.check(m, name, None)
        if m.generator is None:
            raise not_text(m)
        self._generate(name, None, req, "chat")

    def _generate(self, name: str, version: str | None, req: GenRequest, kind: str) -> None:
        ep = self.endpoint
        deadline = time.monotonic() + ep.cfg.generate_timeout_s
        ep.gate.enter(deadline)
        try:
            if peer_gone(self.connection):  # it gave up while it waited in the queue
                self.close_connection = True
                return
            loaded = ep.holder.acquire()
            if loaded is None:
                raise RequestError(503, "no model is active on this device")
            try:
                ep.check(loaded, name, version)
                gen = loaded.generator
                if gen is None:  # swapped to a tensor model while this request waited
                    raise not_text(loaded)
                if req.stream:
                    self._stream(loaded, gen, req, kind, deadline)
                else:
                    self._complete(loaded, gen, req, kind, deadline)
            finally:
                ep.holder.release(loaded)
        finally:
            ep.gate.leave()

    def _complete(
        self, m: Loaded, gen: TextGenerator, req: GenRequest, kind: str, deadline: float
    ) -> None:
        parts: list[str] = []
        sock = self.connection

        def emit(text: str) -> bool:
            parts.append(text)
            return not peer_gone(sock)

        try:
            out = run(gen, req, deadline, emit, self.endpoint.gen_recorder)
        except Exception as exc:  # a runtime's own error types
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}") from None
        if out.cancelled:
            self.close_connection = True
            return
        if out.timed_out:
            raise RequestError(
                504, "generation took longer than serve.generate_timeout_s: ask for fewer tokens"
            )
        text = "".join(parts)
        if kind == "v2":
            self._json(200, {"model_name": m.name, "model_version": m.version, "text_output": text})
            return
        self._json(
            200,
            {
                **_chat_head(m, "chat.completion"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": out.finish,
                    }
                ],
                "usage": _usage(out),
            },
        )

    def _stream(
        self, m: Loaded, gen: TextGenerator, req: GenRequest, kind: str, deadline: float
    ) -> None:
        sock = self.connection
        s = SseStream(sock, self.wfile, self.endpoint.cfg.request_timeout_s)
        s.start(self.close_connection)
        head = _chat_head(m, "chat.completion.chunk")

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        if kind == "chat":
            s.event(chunk({"role": "assistant", "content": ""}, None))

        def emit(text: str) -> bool:
            if peer_gone(sock):
                return False
            if not text:
                return s.alive
            if kind == "v2":
                return s.event(
                    {"model_name": m.name, "model_version": m.version, "text_output": text}
                )
            return s.event(chunk({"content": text}, None))

        try:
            out = run(gen, req, deadline, emit, self.endpoint.gen_recorder)
        except Exception as exc:  # a runtime's own error types: the head is sent, so an event
            s.event({"error": f"generation failed: {type(exc).__name__}: {exc}"})
            self.close_connection = True
            s.end()
            return
        if out.cancelled or not s.alive:
            self.close_connection = True
            return
        if out.timed_out:
            s.event({"error": "generation took longer than serve.generate_timeout_s"})
        elif kind == "chat":
            s.event(chunk({}, out.finish))
            if req.include_usage:
                s.event({**head, "choices": [], "usage": _usage(out)})
            s.event("[DONE]")
        s.end()
        if not s.alive:
            self.close_connection = True


def _chat_head(m: Loaded, obj: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": m.name,
        "system_fingerprint": f"{m.version}-{m.sha256[:12]}",
    }


def _usage(out: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.tokens,
        "total_tokens": out.prompt_tokens + out.tokens,
    }
