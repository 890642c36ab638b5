"""Small LLM on the device: the chosen onnxruntime-genai candidate, raw.

Builds (or reuses from the cache) examples/smollm2 for one profile through the real builder,
then measures the chosen candidate with raw onnxruntime-genai in a fresh process (no agent
code: og.Model + og.Generator), over the build config's prompts: time to first token, decode
tokens/s, peak RSS, plus its size and its next-token agreement with the float model (from the
build). Then a real agent process (mosquitto + `edgefleet-agent run`, the artifact installed)
serves it, and its OpenAI-compatible endpoint (streamed) is measured in turn with the same model
in process: llm_agent_tok_s_ratio, llm_agent_ttft_overhead_ms, llm_agent_peak_rss_mb
(bench/llm_agent.py). --agent-url measures an agent already running instead.

    python3 bench/llm.py                          # x86-ipc; ~4 min cold, ~1 min cached
    python3 bench/llm.py --agent-url http://127.0.0.1:8080 --agent-pid 1234
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
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "examples" / "smollm2" / "edgefleet.toml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def raw_child(
    folder: Path, threads: int, prompts: list[list[dict[str, str]]], tokens: int, rounds: int
) -> dict[str, Any]:
    """Raw onnxruntime-genai, in this (fresh) process: medians over rounds x prompts."""
    import onnxruntime_genai as og

    from builder.llm.probe import peak_rss_kb

    config = og.Config(str(folder))
    config.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
    )
    t0 = time.perf_counter()
    model = og.Model(config)
    tok = og.Tokenizer(model)
    load_s = time.perf_counter() - t0
    template = (folder / "chat_template.jinja").read_text()
    ids = [
        list(
            tok.encode(
                tok.apply_chat_template(
                    json.dumps(p), template_str=template, add_generation_prompt=True
                )
            )
        )
        for p in prompts
    ]
    ttfts, rates = [], []
    for r in range(rounds + 1):  # round 0 warms up
        for prompt in ids:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + tokens, do_sample=False, top_k=1)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens([prompt])
            n, first = 0, 0.0
            while not gen.is_done() and n < tokens:
                gen.generate_next_token()
                n += 1
                if n == 1:
                    first = time.perf_counter()
            end = time.perf_counter()
            if r and n > 1:
                ttfts.append((first - t0) * 1000)
                rates.append((n - 1) / (end - first))
            del gen
    return {
        "load_s": round(load_s, 3),
        "ttft_ms": round(statistics.median(ttfts), 2),
        "ttft_p95_ms": round(sorted(ttfts)[int(0.95 * (len(ttfts) - 1))], 2),
        "tok_s": round(statistics.median(rates), 2),
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
        "samples": len(ttfts),
    }


def agent_endpoint(
    base_url: str, prompts: list[list[dict[str, str]]], tokens: int, rounds: int
) -> dict[str, Any]:
    """The hook for the agent's serving side: streamed OpenAI chat completions against
    ``base_url`` (POST /v1/chat/completions, stream=true, temperature 0), one SSE chunk per
    token. Returns medians of TTFT and decode tokens/s like ``raw_child``."""
    u = urlparse(base_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=120)
    ttfts, rates = [], []
    for r in range(rounds + 1):
        for chat in prompts:
            body = json.dumps(
                {"messages": chat, "max_tokens": tokens, "stream": True, "temperature": 0}
            )
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"{base_url}: HTTP {resp.status}: {resp.read()[:200]!r}")
            n, first = 0, 0.0
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                delta = json.loads(data)["choices"][0].get("delta", {})
                if delta.get("content"):
                    n += 1
                    if n == 1:
                        first = time.perf_counter()
            end = time.perf_counter()
            resp.read()
            if r and n > 1:
                ttfts.append((first - t0) * 1000)
                rates.append((n - 1) / (end - first))
    conn.close()
    if not ttfts:
        raise RuntimeError(f"{base_url}: no streamed tokens")
    return {"ttft_ms": statistics.median(ttfts), "tok_s": statistics.median(rates)}


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def build(
    profile: str, cache: Path, out: Path
) -> tuple[Path, dict[str, Any], list[list[dict[str, str]]], int, Path]:
    from agent.protocol.profile import get_profile
    from agent.protocol.signing import generate_keypair, load_private_key
    from builder.llm.build import LlmBuilder
    from builder.llm.config import load_llm_config

    cfg = load_llm_config(CONFIG)
    if not (out / "keys" / "edgefleet.key").is_file():
        generate_keypair(out / "keys")
    b = LlmBuilder(cfg, load_private_key(out / "keys" / "edgefleet.key"), cache, log)
    prof = get_profile(profile, REPO / "device_profiles")
    t0 = time.perf_counter()
    result = b.build_profile(prof, out)
    log(f"build: {time.perf_counter() - t0:.1f} s")
    for c in result.candidates:
        m = c.metrics
        if m:
            log(
                f"  {c.recipe:12} {m['model_bytes'] / 1e6:6.1f} MB  agree {m['token_agreement']:.3f}  "
                f"greedy {m['greedy_agreement']:.3f}  ppl {m['perplexity']:.2f} ({m['perplexity_increase_pct']:+.1f}%)  "
                f"TTFT {m['ttft_ms']:.0f} ms  {m['decode_tok_s']:.1f} tok/s  RSS {m['peak_rss_mb']:.0f} MB  "
                f"{'CHOSEN' if c is result.chosen else ', '.join(c.violations) or c.error or 'fits'}"
            )
        else:
            log(f"  {c.recipe:12} {c.error}")
    if result.chosen is None:
        raise SystemExit(f"no candidate fits {profile}: {result.error or ''}")
    assert result.artifact is not None
    folder = b.folder(result.chosen.recipe)
    return folder, result.chosen.metrics, b.chats, prof.llm_threads, result.artifact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--profile", default="x86-ipc")
    ap.add_argument("--cache-dir", type=Path, default=REPO / ".edgefleet-cache")
    ap.add_argument("--out", type=Path, default=REPO / ".edgefleet-cache" / "bench-llm")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--agent-rounds",
        type=int,
        default=6,
        help="rounds against a real agent process serving the artifact, interleaved with the "
        "model in process (0: skip)",
    )
    ap.add_argument("--agent-url", default=None, help="a running agent serving the same model")
    ap.add_argument("--agent-pid", type=int, default=None, help="its process id (peak RSS)")
    ap.add_argument("--raw-child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-json", default="[]", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_child is not None:
        print(
            json.dumps(
                raw_child(a.raw_child, a.threads, json.loads(a.prompts_json), a.tokens, a.rounds)
            )
        )
        return
    load0 = os.getloadavg()[0]
    folder, metrics, chats, threads, artifact = build(a.profile, a.cache_dir, a.out)
    log(
        f"raw onnxruntime-genai, fresh process, {threads} threads, {len(chats)} prompts x {a.rounds} rounds"
    )
    args = [
        sys.executable,
        __file__,
        "--raw-child",
        str(folder),
        "--threads",
        str(threads),
        "--prompts-json",
        json.dumps(chats),
        "--tokens",
        str(a.tokens),
        "--rounds",
        str(a.rounds),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    log(
        f"  TTFT p50 {raw['ttft_ms']:.1f} ms, p95 {raw['ttft_p95_ms']:.1f} ms; decode {raw['tok_s']:.1f} tok/s; "
        f"peak RSS {raw['peak_rss_mb']:.0f} MB; load {raw['load_s']:.2f} s"
    )
    result: dict[str, Any] = {
        "profile": a.profile,
        "llm_chosen": metrics.get("precision") or folder.name.removeprefix("genai-"),
        "llm_chosen_size_mb": round(metrics["model_bytes"] / 1e6, 1),
        "llm_token_agreement": round(metrics["token_agreement"], 4),
        "llm_greedy_agreement": round(metrics["greedy_agreement"], 4),
        "llm_perplexity_increase_pct": round(metrics["perplexity_increase_pct"], 2),
        "raw_tok_s": raw["tok_s"],
        "raw_ttft_ms": raw["ttft_ms"],
        "raw_ttft_p95_ms": raw["ttft_p95_ms"],
        "raw_peak_rss_mb": raw["peak_rss_mb"],
        "threads": threads,
    }
    if a.agent_rounds > 0 and not a.agent_url:
        from llm_agent import side_by_side

        prompt = chats[0][-1]["content"]
        log(f"a real agent serving {artifact.name}, side by side with the model in process:")
        sbs = side_by_side(
            artifact,
            a.out / "keys" / "edgefleet.pub",
            folder,
            threads,
            prompt,
            64,
            a.agent_rounds,
            log,
        )
        log(
            f"  decode tok/s: endpoint {sbs['endpoint_tok_s']} vs in process {sbs['raw_tok_s']} "
            f"(ratio {sbs['llm_agent_tok_s_ratio']}, per round {sbs['paired_tok_s_ratio']}); "
            f"TTFT {sbs['endpoint_ttft_ms']} vs {sbs['raw_ttft_ms']} ms "
            f"(+{sbs['llm_agent_ttft_overhead_ms']} ms, per round {sbs['paired_ttft_overhead_ms']}); "
            f"agent peak RSS {sbs['llm_agent_peak_rss_mb']} MB; same text: {sbs['same_text']}"
        )
        for k in ("llm_agent_tok_s_ratio", "llm_agent_ttft_overhead_ms", "llm_agent_peak_rss_mb"):
            result[k] = sbs[k]
        result["llm_agent_paired_tok_s_ratio"] = sbs["paired_tok_s_ratio"]
        result["llm_agent_paired_ttft_overhead_ms"] = sbs["paired_ttft_overhead_ms"]
        result["llm_agent_same_text"] = sbs["same_text"]
    if a.agent_url:
        agent = agent_endpoint(a.agent_url, chats, a.tokens, a.rounds)
        result["llm_agent_tok_s_ratio"] = round(agent["tok_s"] / raw["tok_s"], 3)
        result["llm_agent_ttft_overhead_ms"] = round(agent["ttft_ms"] - raw["ttft_ms"], 2)
        if a.agent_pid:
            result["llm_agent_peak_rss_mb"] = vm_hwm_mb(a.agent_pid)
    result["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
