"""Text generation on the endpoint (v2 generate extension, OpenAI chat), with the fake generator."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import ServeConfig
from agent.runtime import load_session
from agent.serve import Loaded, SessionHolder
from agent.serve.http import Endpoint
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder
from tests.agent_helpers import make_onnx
from tests.textgen_fake import FakeGenerator

REPLY = "The quick brown fox jumps over the lazy dog."


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def text_model(gen: FakeGenerator, version: str = "1") -> Loaded:
    return Loaded.text("chat", version, "ab" * 32, "onnxruntime-genai", gen)


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Endpoint, SessionHolder]]]:
    started: list[Endpoint] = []

    def start(gen: FakeGenerator | None = None, **cfg: Any) -> tuple[Endpoint, SessionHolder]:
        holder = SessionHolder()
        if gen is not None:
            holder.swap(text_model(gen))
        ep = Endpoint(
            ServeConfig(port=0, **cfg), holder, LatencyRecorder(), gen_recorder=GenRecorder()
        )
        ep.start()
        started.append(ep)
        return ep, holder

    try:
        yield start
    finally:
        for ep in started:
            ep.stop()


def conn(ep: Endpoint) -> http.client.HTTPConnection:
    host, port = ep.address.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


def post(ep: Endpoint, path: str, doc: Any) -> tuple[int, dict[str, str], bytes]:
    c = conn(ep)
    try:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        c.request("POST", path, body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def events(raw: bytes) -> list[str]:
    return [ln[6:] for ln in raw.decode().split("\n\n") if ln.startswith("data: ")]


def dechunk(raw: bytes) -> bytes:
    out = b""
    while raw:
        size, raw = raw.split(b"\r\n", 1)
        n = int(size, 16)
        out, raw = out + raw[:n], raw[n + 2 :]
    return out


def test_v2_generate_and_stream(serve: Any) -> None:
    ep, _ = serve(FakeGenerator(REPLY))
    st, _, body = post(ep, "/v2/models/chat/generate", {"text_input": "hi"})
    assert st == 200
    assert json.loads(body) == {"model_name": "chat", "model_version": "1", "text_output": REPLY}
    st, hdr, body = post(
        ep,
        "/v2/models/chat/versions/1/generate_stream",
        {"text_input": "hi", "parameters": {"stop": ["fox"], "max_tokens": 100}},
    )
    assert st == 200 and hdr["Content-Type"].startswith("text/event-stream")
    ev = [json.loads(e) for e in events(body)]
    assert len(ev) > 1 and all(e["model_name"] == "chat" for e in ev)
    assert "".join(e["text_output"] for e in ev) == "The quick brown "
    st, _, body = post(
        ep, "/v2/models/chat/generate", {"text_input": "hi", "parameters": {"max_tokens": 5}}
    )
    assert json.loads(body)["text_output"] == REPLY[:5]


def test_chat_completions_with_usage_and_stream(serve: Any) -> None:
    gen = FakeGenerator(reply_fn=lambda prompt: f"echo {len(prompt)}")
    ep, _ = serve(gen)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = gen.chat_prompt(msgs)
    st, _, body = post(ep, "/v1/chat/completions", {"model": "chat", "messages": msgs})
    doc = json.loads(body)
    assert st == 200 and doc["object"] == "chat.completion" and doc["model"] == "chat"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": f"echo {len(prompt)}"}
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["prompt_tokens"] == len(gen.encode(prompt))
    assert doc["usage"]["completion_tokens"] == len(f"echo {len(prompt)}")
    st, _, body = post(
        ep,
        "/v1/chat/completions",
        {
            "model": "chat",
            "messages": msgs,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    ev = events(body)
    assert st == 200 and ev[-1] == "[DONE]"
    chunks = [json.loads(e) for e in ev[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "ech"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []
    st, _, body = post(ep, "/v1/chat/completions", {"messages": msgs})  # no "model": the one served
    assert st == 200 and json.loads(body)["model"] == "chat"
    c = conn(ep)
    c.request("GET", "/v1/models")
    assert json.loads(c.getresponse().read())["data"][0]["id"] == "chat"
    c.close()


def test_queue_full_gets_503_with_retry_after(serve: Any) -> None:
    gen = FakeGenerator(REPLY, delay_s=0.005)
    ep, _ = serve(gen, max_generations=1, max_queued_generations=1)
    results: list[int] = []

    def one() -> None:
        results.append(post(ep, "/v2/models/chat/generate", {"text_input": "x"})[0])

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: gen.active == 1 and ep.gate.depth == 1)
    st, hdr, body = post(ep, "/v2/models/chat/generate", {"text_input": "x"})
    assert st == 503 and hdr["Retry-After"] == "1" and b"busy" in body
    for t in threads:
        t.join()
    assert results == [200, 200] and gen.max_active == 1
    w = ep.gen_recorder.window()
    assert w is not None and w.rejected == 1 and w.queue_max == 1 and w.requests == 2
    assert w.tokens == 2 * len(REPLY) and w.tok_s is not None and w.ttft_p95_ms is not None


def test_two_slots_run_two_generations_at_once_and_queue_the_third(serve: Any) -> None:
    gen = FakeGenerator(REPLY, delay_s=0.01)
    ep, _ = serve(gen, max_generations=2, max_queued_generations=2)
    results: list[tuple[int, bytes]] = []

    def one() -> None:
        st, _, body = post(ep, "/v2/models/chat/generate", {"text_input": "x"})
        results.append((st, body))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: gen.active == 2 and ep.gate.depth == 1)
    for t in threads:
        t.join()
    assert [st for st, _ in results] == [200, 200, 200] and gen.max_active == 2
    assert all(json.loads(b)["text_output"] == REPLY for _, b in results)
    w = ep.gen_recorder.window()
    assert w is not None and w.requests == 3 and w.rejected == 0 and w.queue_max == 1


def _open_stream(ep: Endpoint, path: str, doc: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """A raw connection with a streaming request sent and its first event read."""
    host, port = ep.address.removeprefix("http://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps(doc).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    got = b""
    while b"data: " not in got:
        got += s.recv(4096)
    return s, got


def test_client_disconnect_cancels_its_generation(serve: Any) -> None:
    gen = FakeGenerator("x" * 2000, delay_s=0.005)
    ep, _ = serve(gen)
    s, _ = _open_stream(ep, "/v2/models/chat/generate_stream", {"text_input": "x"})
    s.close()
    wait_for(lambda: gen.active == 0)
    w = ep.gen_recorder.window()
    assert w is not None and w.cancelled == 1 and w.tokens < 1000


def test_swap_mid_stream_finishes_on_the_old_model(serve: Any) -> None:
    old = FakeGenerator("old " * 25, delay_s=0.003)
    ep, holder = serve(old, max_generations=2)
    s, raw = _open_stream(
        ep,
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": "q"}], "stream": True},
    )
    new = FakeGenerator("new")
    holder.swap(text_model(new, "2"))
    st, _, body = post(ep, "/v2/models/chat/generate", {"text_input": "q"})
    assert (st, json.loads(body)["text_output"], json.loads(body)["model_version"]) == (
        200,
        "new",
        "2",
    )
    assert not old.closed
    s.settimeout(10)
    while not raw.endswith(b"0\r\n\r\n"):
        raw += s.recv(65536)
    s.close()
    ev = events(dechunk(raw.split(b"\r\n\r\n", 1)[1]))
    assert ev[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in ev[:-1]]
    assert "".join(c["delta"].get("content", "") for c in chunks) == "old " * 25
    assert chunks[-1]["finish_reason"] == "stop"
    wait_for(lambda: old.closed)  # closed once its last stream released it


def test_bad_requests_get_a_4xx_with_a_reason(serve: Any, tmp_path: Path) -> None:
    ep, holder = serve(FakeGenerator(REPLY), max_tokens_limit=64)
    cases: list[tuple[str, Any, int, str]] = [
        ("/v2/models/chat/generate", {"parameters": {}}, 400, "text_input"),
        (
            "/v2/models/chat/generate",
            {"text_input": "x", "parameters": {"max_tokens": 65}},
            400,
            "max_tokens_limit",
        ),
        (
            "/v2/models/chat/generate",
            {"text_input": "x", "parameters": {"temperature": -1}},
            400,
            "temperature",
        ),
        ("/v2/models/chat/generate", {"text_input": "x", "parameters": {"stop": 3}}, 400, "stop"),
        ("/v2/models/chat/generate", b"{not json", 400, "not valid JSON"),
        ("/v2/models/other/generate", {"text_input": "x"}, 404, "unknown model"),
        ("/v2/models/chat/infer", {"inputs": []}, 400, "generates text"),
        ("/v1/chat/completions", {"model": "chat", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": 3, "messages": [{"role": "user", "content": "x"}]},
            400,
            "model",
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
            404,
            "unknown model",
        ),
        (
            "/v1/chat/completions",
            {"model": "chat", "n": 2, "messages": [{"role": "user", "content": "x"}]},
            400,
            "n must be 1",
        ),
    ]
    for path, doc, status, reason in cases:
        st, _, body = post(ep, path, doc)
        err = json.loads(body)["error"]
        msg = err["message"] if isinstance(err, dict) else err
        assert (st, reason in msg) == (status, True), (path, doc, st, msg)
    c = conn(ep)
    c.request("GET", "/v2/models/chat/generate")
    assert c.getresponse().status == 405
    c.close()
    make_onnx(tmp_path / "m.onnx", seed=0)
    sess = load_session("onnxruntime", tmp_path / "m.onnx")
    holder.swap(Loaded("chat", "3", "0" * 64, "onnxruntime", sess))
    st, _, body = post(ep, "/v2/models/chat/generate", {"text_input": "x"})
    assert st == 400 and "takes tensors" in json.loads(body)["error"]


def test_the_openai_client_works_unchanged(serve: Any) -> None:
    openai = pytest.importorskip("openai")
    ep, _ = serve(FakeGenerator(REPLY))
    client = openai.OpenAI(base_url=ep.address + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["chat"]
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="chat", messages=msgs, max_tokens=9)
    assert r.choices[0].message.content == REPLY[:9] and r.usage.completion_tokens == 9
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="chat", messages=msgs, stream=True)
        if c.choices
    ]
    assert "".join(pieces) == REPLY
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="nope", messages=msgs)


def test_a_client_gone_while_queued_never_starts_generating(serve: Any) -> None:
    gen = FakeGenerator("y" * 60, delay_s=0.005)
    ep, _ = serve(gen, max_generations=1)
    first, _ = _open_stream(ep, "/v2/models/chat/generate_stream", {"text_input": "x"})
    host, port = ep.address.removeprefix("http://").rsplit(":", 1)
    second = socket.create_connection((host, int(port)), timeout=10)
    body = b'{"text_input": "x"}'
    second.sendall(
        b"POST /v2/models/chat/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    wait_for(lambda: ep.gate.depth == 1)
    second.close()
    first.settimeout(10)
    raw = b""
    while not raw.endswith(b"0\r\n\r\n"):
        raw += first.recv(65536)
    first.close()
    wait_for(lambda: ep.gate.depth == 0 and gen.active == 0)
    assert gen.calls == 1


def test_the_bench_hook_measures_a_stream(serve: Any) -> None:
    from bench.llm_endpoint import compare, measure_endpoint, measure_inprocess

    gen = FakeGenerator(REPLY, delay_s=0.001)
    ep, _ = serve(gen)
    via = measure_endpoint(ep.address, "hi", max_tokens=20)
    raw = measure_inprocess(gen, "hi", max_tokens=20)
    assert via.text == raw.text == REPLY[:20] and via.tokens == raw.tokens == 20
    assert via.tok_s is not None and via.ttft_ms > 0
    out = compare([raw], [via])
    assert out["same_text"] and 0 < out["llm_agent_tok_s_ratio"] < 2
