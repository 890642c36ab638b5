"""Text generation on the endpoint: the queue that bounds it, request parsing, the token loop.

Two request shapes reach the same loop: the v2 generate extension (Triton's
``/v2/models/{name}/generate[_stream]``: ``{"text_input", "parameters": {...}}``) and the
OpenAI chat API (``/v1/chat/completions``: ``{"messages", "max_tokens", ...}``). Sampling
defaults to greedy (temperature 0) in both, so an answer is repeatable unless asked otherwise.

At most ``serve.max_generations`` run at once; up to ``serve.max_queued_generations`` more wait
for a slot, in arrival order, and beyond that a request gets 503 with Retry-After. A generation
holds a reference on the model it began with (``SessionHolder``), so a swap lets it finish on
the old model while the next request runs on the new one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.errors import UsageError
from agent.runtime.textgen import GenParams, TextGenerator, Token
from agent.serve.tensors import RequestError
from agent.telemetry.generation import GenRecorder

MAX_STOPS = 8
MAX_MESSAGES = 1000


class GenGate:
    """Bounded concurrency with a bounded FIFO queue in front of it."""

    def __init__(self, slots: int, max_queued: int, recorder: GenRecorder) -> None:
        self._slots, self._max_queued, self.recorder = slots, max_queued, recorder
        self._cond = threading.Condition()
        self._running = 0
        self._queue: deque[object] = deque()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def enter(self, deadline: float) -> None:
        """Wait for a slot until ``deadline`` (monotonic); RequestError 503 when the queue is
        full or the wait runs out."""
        with self._cond:
            if self._running < self._slots and not self._queue:
                self._running += 1
                return
            if len(self._queue) >= self._max_queued:
                self.recorder.rejected()
                raise RequestError(
                    503,
                    f"busy: {self._running} generating and {len(self._queue)} waiting "
                    "(serve.max_queued_generations): try again shortly",
                    retry_after=1,
                )
            me = object()
            self._queue.append(me)
            self.recorder.queued(len(self._queue))
            try:
                while not (self._running < self._slots and self._queue[0] is me):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.recorder.rejected()
                        raise RequestError(
                            503,
                            "busy: waited for a generation slot past serve.generate_timeout_s",
                            retry_after=1,
                        )
                    self._cond.wait(left)
                self._running += 1
            finally:
                self._queue.remove(me)
                self.recorder.queued(len(self._queue))
                self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()


@dataclass(frozen=True)
class GenRequest:
    """A parsed request: ``prompt`` is plain text (v2) or None with ``messages`` (chat)."""

    params: GenParams
    stream: bool
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    include_usage: bool = False

    def prompt_text(self, gen: TextGenerator) -> str:
        if self.messages is not None:
            return gen.chat_prompt(self.messages)
        return self.prompt or ""


def _num(doc: dict[str, Any], key: str, default: float, what: str) -> float:
    v = doc.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(400, f"{what}{key} must be a number")
    return float(v)


def _params(doc: dict[str, Any], what: str, limit: int) -> GenParams:
    """GenParams from max_tokens (or max_completion_tokens), temperature, top_p, stop, seed."""
    mt = doc.get("max_tokens", doc.get("max_completion_tokens"))
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int)):
        raise RequestError(400, f"{what}max_tokens must be an integer")
    if mt is not None and not 1 <= mt <= limit:
        raise RequestError(
            400, f"{what}max_tokens must be between 1 and {limit} (serve.max_tokens_limit)"
        )
    stop = doc.get("stop")
    stops: tuple[str, ...] = ()
    if isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    elif stop is not None:
        raise RequestError(400, f"{what}stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"{what}stop holds at most {MAX_STOPS} strings")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"{what}seed must be an integer")
    try:
        return GenParams(
            max_new_tokens=mt if mt is not None else min(GenParams.max_new_tokens, limit),
            temperature=_num(doc, "temperature", 0.0, what),
            top_p=_num(doc, "top_p", 1.0, what),
            stop=tuple(s for s in stops if s),
            seed=seed,
        )
    except UsageError as exc:
        raise RequestError(400, f"{what}{exc}") from None


def _obj(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RequestError(400, f"{what} must be a JSON object")
    return doc


def parse_v2(doc: Any, stream: bool, limit: int) -> GenRequest:
    """Triton's generate extension: {"text_input": str, "parameters": {...}}."""
    doc = _obj(doc, "the request body")
    text = doc.get("text_input")
    if not isinstance(text, str):
        raise RequestError(400, 'the request needs "text_input": a string')
    params = _obj(doc.get("parameters", {}), "parameters")
    return GenRequest(_params(params, "parameters.", limit), stream, prompt=text)


def parse_chat(doc: Any, limit: int) -> GenRequest:
    """OpenAI's chat completions request (the subset a single-answer device model serves)."""
    doc = _obj(doc, "the request body")
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        raise RequestError(400, f'"messages" must be a list of 1 to {MAX_MESSAGES} messages')
    messages: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f'messages[{i}] must be an object with a "role"')
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(str(p) for p in parts)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string")
        messages.append({"role": m["role"], "content": content})
    n = doc.get("n", 1)
    if n != 1:
        raise RequestError(400, "n must be 1: this endpoint returns one choice")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false")
    opts = doc.get("stream_options") or {}
    usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    return GenRequest(_params(doc, "", limit), stream, messages=messages, include_usage=usage)


@dataclass
class Outcome:
    """How a generation ended: ``finish`` is "stop" or "length" (OpenAI's finish_reason)."""

    tokens: int = 0
    prompt_tokens: int = 0
    finish: str = "stop"
    cancelled: bool = False
    timed_out: bool = False
    ttft_s: float | None = None


def run(
    gen: TextGenerator,
    req: GenRequest,
    deadline: float,
    emit: Callable[[str], bool],
    recorder: GenRecorder,
) -> Outcome:
    """Generate and hand each token's text to ``emit``; stop when ``emit`` returns False (the
    client is gone), at the deadline, or when the generator ends. The runtime's own errors
    propagate (counted as errors)."""
    out = Outcome()
    cancel = threading.Event()
    t0 = time.monotonic()
    first = last = t0
    try:
        ids = gen.encode(req.prompt_text(gen))
        out.prompt_tokens = len(ids)
        tokens: Iterator[Token] = gen.generate(ids, req.params, cancel)
        try:
            for tok in tokens:
                last = time.monotonic()
                out.tokens += 1
                if out.tokens == 1:
                    first = last
                    out.ttft_s = last - t0
                if not emit(tok.text):  # every token: an empty one still checks the client
                    out.cancelled = True
                    break
                if last > deadline:
                    out.timed_out = True
                    break
        finally:
            cancel.set()
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # a generator function: runs its cleanup now, not at garbage collection
    except Exception:
        recorder.error()
        raise
    if out.tokens >= req.params.max_new_tokens:
        out.finish = "length"
    recorder.finished(out.tokens, out.ttft_s, last - first, out.cancelled)
    return out
