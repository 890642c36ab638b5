"""Streaming decode speed and time to first token through the agent's endpoint, against the same
generation run in process, side by side in interleaved rounds.

``measure_endpoint(base_url, prompt)`` is the hook bench/llm.py calls: it streams
``/v1/chat/completions`` (usage included) and times, on the client, the first content event
(TTFT, from sending the request) and the last one (decode tokens/s: tokens after the first over
the time from first to last). ``measure_inprocess(generator, prompt)`` times the same thing on a
TextGenerator directly. Their ratio and difference are llm_agent_tok_s_ratio (target >= 0.9) and
llm_agent_ttft_overhead_ms (target <= 10). ``floor()`` measures the endpoint's own cost with a
generator that costs nothing (per token and before the first), which load barely moves.

The endpoint runs in a child process, as the agent does, so the client's parsing does not share
an interpreter (and its lock) with the generation it times.

    python3 bench/llm_endpoint.py MODEL_DIR            # a genai folder; ~1 min with SmolLM2-135M
    python3 bench/llm_endpoint.py MODEL_DIR --rounds 5 --max-tokens 96
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"llm_agent_tok_s_ratio": 0.9, "llm_agent_ttft_overhead_ms": 10.0}
PROMPT = "Write a long story about a dragon who learns to bake bread."


@dataclass(frozen=True)
class Run:
    tokens: int
    ttft_ms: float
    tok_s: float | None  # None with fewer than two tokens
    text: str


def _speed(tokens: int, first: float, last: float) -> float | None:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else None


def measure_endpoint(
    base_url: str,
    prompt: str,
    max_tokens: int = 64,
    model: str | None = None,
    timeout_s: float = 300.0,
) -> Run:
    """One streamed chat completion through the endpoint at ``base_url`` (http://host:port),
    greedy, ``max_tokens`` at most; ``model`` defaults to the one GET /v1/models lists."""
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout_s)
    try:
        if model is None:
            conn.request("GET", "/v1/models")
            data = json.loads(conn.getresponse().read())["data"]
            if not data:
                raise RuntimeError(f"{base_url} serves no text-generation model")
            model = str(data[0]["id"])
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
        first = last = None
        tokens, parts = 0, []
        for raw in resp:  # one SSE line at a time (http.client undoes the chunking)
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                tokens = int(doc["usage"]["completion_tokens"])
            for ch in doc.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece:
                    last = time.perf_counter()
                    first = first if first is not None else last
                    parts.append(piece)
        if first is None or last is None:
            raise RuntimeError("the stream carried no text")
        return Run(tokens, (first - t0) * 1000, _speed(tokens, first, last), "".join(parts))
    finally:
        conn.close()


def measure_inprocess(generator: Any, prompt: str, max_tokens: int = 64) -> Run:
    """The same chat generation on a TextGenerator in this process (prompt templating and
    tokenizing inside the timed span, as the endpoint does them)."""
    from agent.runtime.textgen import GenParams

    t0 = time.perf_counter()
    ids = generator.encode(generator.chat_prompt([{"role": "user", "content": prompt}]))
    first = last = None
    tokens, parts = 0, []
    for tok in generator.generate(ids, GenParams(max_new_tokens=max_tokens)):
        tokens += 1
        if tok.text:  # the endpoint's clock sees text, so this one does too
            last = time.perf_counter()
            first = first if first is not None else last
            parts.append(tok.text)
    if first is None or last is None:
        raise RuntimeError("the model generated no text")
    return Run(tokens, (first - t0) * 1000, _speed(tokens, first, last), "".join(parts))


def compare(raw: list[Run], ep: list[Run]) -> dict[str, Any]:
    """Medians over rounds, and the two figures bench/llm.py reports."""

    def med(runs: list[Run], key: str) -> float:
        vals = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        return float(statistics.median(vals)) if vals else float("nan")

    raw_tok, ep_tok = med(raw, "tok_s"), med(ep, "tok_s")
    raw_ttft, ep_ttft = med(raw, "ttft_ms"), med(ep, "ttft_ms")
    # Per round (the two runs of a round back to back, so under the same load), then the median:
    # on a shared machine the load drifts between rounds more than the endpoint costs.
    pairs = list(zip(raw, ep, strict=True))
    ratios = [b.tok_s / a.tok_s for a, b in pairs if a.tok_s and b.tok_s]
    return {
        "paired_tok_s_ratio": round(float(statistics.median(ratios)), 4) if ratios else None,
        "paired_ttft_overhead_ms": round(
            float(statistics.median(b.ttft_ms - a.ttft_ms for a, b in pairs)), 2
        ),
        "raw_tok_s": round(raw_tok, 2),
        "endpoint_tok_s": round(ep_tok, 2),
        "raw_ttft_ms": round(raw_ttft, 2),
        "endpoint_ttft_ms": round(ep_ttft, 2),
        "llm_agent_tok_s_ratio": round(ep_tok / raw_tok, 4),
        "llm_agent_ttft_overhead_ms": round(ep_ttft - raw_ttft, 2),
        "same_text": all(a.text == b.text for a, b in zip(raw, ep, strict=True)),
        "tokens": [r.tokens for r in ep],
    }


def floor(tokens: int = 4000) -> dict[str, float]:
    """What the endpoint itself costs, with a generator that costs nothing (the tests' fake):
    microseconds per streamed token and milliseconds before the first, over the in-process
    figures. Model-independent, so it does not drift with the machine's load as much."""
    from agent.config import ServeConfig
    from agent.serve import Loaded, SessionHolder
    from agent.serve.http import Endpoint
    from agent.telemetry.latency import LatencyRecorder
    from tests.textgen_fake import FakeGenerator

    gen = FakeGenerator("abcdefgh" * (tokens // 8 + 1))
    holder = SessionHolder()
    holder.swap(Loaded.text("fake", "1", "0" * 64, "fake", gen))
    ep = Endpoint(ServeConfig(port=0, max_tokens_limit=tokens), holder, LatencyRecorder())
    ep.start()
    try:
        per_tok, ttft = [], []
        for _ in range(3):
            a = measure_inprocess(gen, "hi", tokens)
            b = measure_endpoint(ep.address, "hi", tokens)
            if a.tok_s and b.tok_s:
                per_tok.append((1 / b.tok_s - 1 / a.tok_s) * 1e6)
            ttft.append(b.ttft_ms - a.ttft_ms)
    finally:
        ep.stop()
    return {
        "floor_us_per_token": round(float(statistics.median(per_tok)), 1),
        "floor_ttft_overhead_ms": round(float(statistics.median(ttft)), 2),
    }


def serve(model_dir: Path, threads: int) -> None:
    """The endpoint alone, on a free port, serving ``model_dir`` until terminated."""
    import signal
    import threading

    from agent.config import ServeConfig
    from agent.runtime.textgen import load_generator
    from agent.serve import Loaded, SessionHolder
    from agent.serve.http import Endpoint
    from agent.telemetry.latency import LatencyRecorder

    holder = SessionHolder()
    gen = load_generator(model_dir, threads=threads)
    holder.swap(Loaded.text("llm", "1", "0" * 64, "onnxruntime-genai", gen))
    ep = Endpoint(ServeConfig(port=0), holder, LatencyRecorder())
    ep.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(ep.address, flush=True)
    stop.wait()
    ep.stop()
    holder.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="an onnxruntime-genai model folder")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.model_dir, args.threads)
        return

    from agent.runtime.textgen import load_generator

    load0 = os.getloadavg()[0]
    gen = load_generator(args.model_dir, threads=args.threads)
    child = subprocess.Popen(
        [sys.executable, __file__, str(args.model_dir), "--serve", "--threads", str(args.threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    raw: list[Run] = []
    via: list[Run] = []
    try:
        assert child.stdout is not None
        address = child.stdout.readline().strip()  # the child prints it once it listens
        if not address.startswith("http://"):
            raise RuntimeError("the endpoint process did not start")
        measure_inprocess(gen, args.prompt, 8)  # warm-up, both paths
        measure_endpoint(address, args.prompt, 8)
        for i in range(args.rounds):  # interleaved; the order alternates
            order = ("raw", "ep") if i % 2 == 0 else ("ep", "raw")
            for which in order:
                if which == "raw":
                    raw.append(measure_inprocess(gen, args.prompt, args.max_tokens))
                else:
                    via.append(measure_endpoint(address, args.prompt, args.max_tokens))
            print(
                f"round {i + 1}: raw {raw[-1].tok_s or 0:.1f} tok/s ttft {raw[-1].ttft_ms:.1f} ms"
                f" | endpoint {via[-1].tok_s or 0:.1f} tok/s ttft {via[-1].ttft_ms:.1f} ms",
                file=sys.stderr,
            )
    finally:
        child.terminate()
        child.wait(30)
    out = compare(raw, via)
    out.update(floor())
    out.update(
        rounds=args.rounds,
        max_tokens=args.max_tokens,
        threads=args.threads,
        targets=TARGETS,
        loadavg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)],
        runs={"raw": [asdict(r) for r in raw], "endpoint": [asdict(r) for r in via]},
    )
    for k in (
        "raw_tok_s",
        "endpoint_tok_s",
        "raw_ttft_ms",
        "endpoint_ttft_ms",
        "paired_tok_s_ratio",
        "paired_ttft_overhead_ms",
        "floor_us_per_token",
        "floor_ttft_overhead_ms",
    ):
        print(f"{k:28s} {out[k]}")
    for k, target in TARGETS.items():
        print(f"{k:28s} {out[k]}  (target {'>=' if 'ratio' in k else '<='} {target})")
    del out["runs"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
