"""On-device checks for text-generation artifacts: golden prompts replayed greedily, then TTFT
and decode speed against the budgets the model was built with and against the model it replaces.

Called from agent.deploy.selftest, which dispatches on the manifest's task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import EdgefleetError
from agent.protocol.golden_llm import GoldenPrompt, GoldenPrompts, prefix_mismatch
from agent.protocol.manifest import DEFAULT_PREFIX_TOKENS, Manifest
from agent.protocol.states import p95_regressed
from agent.runtime.base import IOSpec
from agent.runtime.textgen import GeneratorSession, GenParams, TextGenerator, load_generator
from agent.store.versions import Installed
from agent.telemetry.latency import p50_p95_p99

# Generation is slow next to a tensor inference: a few timed runs, each one short answer.
MAX_RUNS = 5
BENCH_TOKENS = 32
BENCH_MAX_S = 30.0


@dataclass
class GenSpeed:
    ttft_p50_ms: float
    ttft_p95_ms: float
    decode_tok_s: float  # median over runs, tokens after the first per second
    runs: int

    def detail(self) -> dict[str, object]:
        return {
            "ttft_p50_ms": round(self.ttft_p50_ms, 3),
            "ttft_p95_ms": round(self.ttft_p95_ms, 3),
            "decode_tok_s": round(self.decode_tok_s, 2),
            "runs": self.runs,
        }


def load(inst: Installed, threads: int, providers: tuple[str, ...]) -> GeneratorSession:
    m = inst.manifest
    gen = load_generator(inst.dir / m.model.file, threads=threads, providers=providers)
    return GeneratorSession(gen, _specs(m, "inputs"), _specs(m, "outputs"))


def _specs(m: Manifest, which: str) -> list[IOSpec]:
    tensors = m.model.inputs if which == "inputs" else m.model.outputs
    return [IOSpec(t.name, t.dtype, tuple(t.shape)) for t in tensors]


def golden_of(inst: Installed) -> GoldenPrompts:
    return GoldenPrompts.load(inst.dir / inst.manifest.golden.file)


def prompt_ids(gen: TextGenerator, prompt: GoldenPrompt) -> list[int]:
    return gen.encode(gen.chat_prompt(prompt.chat()))


def greedy(gen: TextGenerator, ids: list[int], max_new_tokens: int) -> list[int]:
    return [t.id for t in gen.generate(ids, GenParams(max_new_tokens=max_new_tokens))]


def golden_check(gen: TextGenerator, m: Manifest, golden: GoldenPrompts) -> str | None:
    """None when every prompt reproduces its first ``prefix_tokens`` expected tokens."""
    prefix = m.golden.prefix_tokens or DEFAULT_PREFIX_TOKENS
    for i, prompt in enumerate(golden.prompts):
        need = min(prefix, len(prompt.tokens))
        try:
            got = greedy(gen, prompt_ids(gen, prompt), need)
        except Exception as exc:  # the runtime's own error types
            return f"prompt {i}: generation failed: {type(exc).__name__}: {exc}"
        at = prefix_mismatch(prompt.tokens, got, prefix)
        if at is not None:
            theirs = got[at] if at < len(got) else "end of text"
            return (
                f"prompt {i}: token {at} is {theirs}, expected {prompt.tokens[at]} "
                f"(the first {need} greedy tokens must match)"
            )
    return None


def benchmark(
    gen: TextGenerator,
    golden: GoldenPrompts,
    runs: int,
    tick: Callable[[], None] | None = None,
    max_s: float = BENCH_MAX_S,
) -> GenSpeed:
    """Greedy answers to the first golden prompt after one untimed warm-up; fewer runs when
    ``max_s`` runs out (at least one)."""
    ids = prompt_ids(gen, golden.prompts[0])
    params = GenParams(max_new_tokens=BENCH_TOKENS)
    for _ in gen.generate(ids, params):
        pass
    ttfts: list[float] = []
    rates: list[float] = []
    deadline = time.monotonic() + max_s
    for _ in range(max(1, min(runs, MAX_RUNS))):
        t0 = time.perf_counter()
        first = 0.0
        n = 0
        for _tok in gen.generate(ids, params):
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        if n:
            ttfts.append((first - t0) * 1000.0)
        if n > 1 and end > first:
            rates.append((n - 1) / (end - first))
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            break
    if not ttfts:
        raise ValueError("the model produced no tokens")
    p50, p95, _ = p50_p95_p99(ttfts)
    rates.sort()
    rate = rates[len(rates) // 2] if rates else 0.0
    return GenSpeed(p50, p95, rate, len(ttfts))


@dataclass
class LlmCheck:
    ok: bool
    reason: str
    detail: dict[str, object]
    speed: GenSpeed | None = None


def check_candidate(
    gen: TextGenerator,
    inst: Installed,
    golden: GoldenPrompts,
    runs: int,
    slack_ms: float,
    current: tuple[TextGenerator, GoldenPrompts] | None,
    tick: Callable[[], None] | None = None,
) -> LlmCheck:
    """Golden prompts, then TTFT and decode speed against the manifest's budgets (max_ttft_ms,
    min_decode_tok_s) and against the current text-generation model (regression limits)."""
    m = inst.manifest
    problem = golden_check(gen, m, golden)
    if problem is not None:
        return LlmCheck(False, f"self-test failed: {problem}", {})
    try:
        speed = benchmark(gen, golden, runs, tick)
    except Exception as exc:  # a runtime's own error types
        return LlmCheck(False, f"benchmark failed: {type(exc).__name__}: {exc}", {})
    detail = speed.detail()
    budgets = m.budgets or {}
    max_ttft = _num(budgets.get("max_ttft_ms"))
    min_rate = _num(budgets.get("min_decode_tok_s"))
    if max_ttft is not None and speed.ttft_p95_ms > max_ttft:
        return LlmCheck(
            False,
            f"TTFT p95 {speed.ttft_p95_ms:.1f} ms exceeds the budget {max_ttft:g} ms",
            detail,
            speed,
        )
    if min_rate is not None and speed.decode_tok_s < min_rate:
        return LlmCheck(
            False,
            f"decode {speed.decode_tok_s:.1f} tokens/s is below the budget {min_rate:g}",
            detail,
            speed,
        )
    if current is not None:
        reason = _regression(speed, current, budgets, runs, slack_ms, tick, detail)
        if reason is not None:
            return LlmCheck(False, reason, detail, speed)
    return LlmCheck(True, "", detail, speed)


def _regression(
    speed: GenSpeed,
    current: tuple[TextGenerator, GoldenPrompts],
    budgets: dict[str, object],
    runs: int,
    slack_ms: float,
    tick: Callable[[], None] | None,
    detail: dict[str, object],
) -> str | None:
    try:
        cur = benchmark(current[0], current[1], runs, tick)
    except (EdgefleetError, Exception) as exc:
        detail["current_error"] = str(exc)
        return None
    detail["current_ttft_p95_ms"] = round(cur.ttft_p95_ms, 3)
    detail["current_decode_tok_s"] = round(cur.decode_tok_s, 2)
    ttft_pct = _num(budgets.get("max_ttft_regression_pct"))
    rate_pct = _num(budgets.get("max_decode_regression_pct"))
    if ttft_pct is not None and p95_regressed(
        speed.ttft_p95_ms, cur.ttft_p95_ms, ttft_pct, slack_ms
    ):
        return (
            f"TTFT p95 {speed.ttft_p95_ms:.1f} ms is more than {ttft_pct:g}% (+{slack_ms:g} ms) "
            f"worse than the current model's {cur.ttft_p95_ms:.1f} ms"
        )
    if rate_pct is not None and speed.decode_tok_s < cur.decode_tok_s * (1 - rate_pct / 100):
        return (
            f"decode {speed.decode_tok_s:.1f} tokens/s is more than {rate_pct:g}% below the "
            f"current model's {cur.decode_tok_s:.1f}"
        )
    return None


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None
