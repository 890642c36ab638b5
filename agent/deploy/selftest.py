"""On-device checks before activation: golden self-test and a short latency benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.deploy import selftest_llm
from agent.errors import EdgefleetError
from agent.protocol.golden import GoldenSet, self_test
from agent.protocol.golden_llm import GoldenPrompts
from agent.protocol.states import p95_regressed
from agent.runtime import InferenceSession, load_session
from agent.runtime.textgen import GeneratorSession, GenParams
from agent.store.versions import Installed
from agent.telemetry.latency import p50_p95_p99

# Untimed calls before a benchmark's measured runs (first-call allocations, caches).
WARMUP_RUNS = 3

# Golden vectors of a tensor model, or golden prompts of a text-generation model.
AnyGolden = GoldenSet | GoldenPrompts


@dataclass
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""
    latency: Latency | None = None
    detail: dict[str, object] = field(default_factory=dict)
    golden: AnyGolden | None = None  # the candidate's golden set, loaded once for the check


def load(
    inst: Installed, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> InferenceSession:
    """The model's session; a text-generation model's is a GeneratorSession."""
    if inst.manifest.is_text_generation:
        return selftest_llm.load(inst, threads, providers)
    return load_session(
        inst.manifest.runtime,
        inst.dir / inst.manifest.model.file,
        threads=threads,
        providers=providers,
    )


def golden_of(inst: Installed) -> AnyGolden:
    if inst.manifest.is_text_generation:
        return selftest_llm.golden_of(inst)
    return GoldenSet.load(inst.dir / inst.manifest.golden.file)


def warm_up(session: InferenceSession, golden: AnyGolden) -> None:
    """One untimed call before serving (a few tokens for a text-generation model)."""
    if isinstance(session, GeneratorSession) and isinstance(golden, GoldenPrompts):
        gen = session.generator
        ids = selftest_llm.prompt_ids(gen, golden.prompts[0])
        for _ in gen.generate(ids, GenParams(max_new_tokens=2)):
            pass
    elif isinstance(golden, GoldenSet):
        session.infer(golden.bench_feed())
    else:
        raise ValueError("golden set does not match the model's task")


def benchmark(
    session: InferenceSession,
    golden: GoldenSet,
    runs: int,
    record: Callable[[float], None] | None = None,
    max_s: float | None = None,
) -> Latency:
    """Batch-1 latency over ``runs`` calls after a short warm-up (fewer if ``max_s`` runs out);
    each measured call's milliseconds also go to ``record`` when given."""
    feeds = golden.bench_feed()
    for _ in range(WARMUP_RUNS):
        session.infer(feeds)
    times = []
    deadline = None if max_s is None else time.monotonic() + max_s
    for _ in range(runs):
        t0 = time.perf_counter()
        session.infer(feeds)
        ms = (time.perf_counter() - t0) * 1000.0
        times.append(ms)
        if record is not None:
            record(ms)
        if deadline is not None and time.monotonic() > deadline:
            break
    p50, p95, p99 = p50_p95_p99(times)
    return Latency(p50, p95, len(times), p99, max(times))


def golden_check(session: InferenceSession, inst: Installed, golden: AnyGolden) -> str | None:
    """None when the golden self-test passes, else the reason."""
    if isinstance(golden, GoldenPrompts):
        if not isinstance(session, GeneratorSession):
            return "golden prompts need a text-generation model"
        return selftest_llm.golden_check(session.generator, inst.manifest, golden)
    res = self_test(session, golden, inst.manifest.golden, inst.manifest.task == "classification")
    return None if res.ok else (res.reason or "golden self-test failed")


def check_candidate(
    session: InferenceSession,
    inst: Installed,
    runs: int,
    max_p95_ms: float | None,
    max_regression_pct: float | None,
    slack_ms: float,
    current: tuple[InferenceSession, AnyGolden] | None,
    tick: Callable[[], None] | None = None,
) -> CheckResult:
    """Golden self-test, then the latency budget and regression checks. ``tick`` is called after
    every benchmark run (the agent pings systemd's watchdog from it during a long self-test)."""
    per_run = None if tick is None else (lambda _ms: tick())
    try:
        any_golden = golden_of(inst)
    except (OSError, ValueError, EdgefleetError) as exc:
        return CheckResult(False, f"golden vectors unreadable: {exc}")
    if isinstance(any_golden, GoldenPrompts):
        return _check_llm(session, inst, any_golden, runs, slack_ms, current, tick)
    golden = any_golden
    problem = golden_check(session, inst, golden)
    if problem is not None:
        return CheckResult(False, f"self-test failed: {problem}")
    try:
        lat = benchmark(session, golden, runs, per_run)
    except Exception as exc:  # a runtime's own error types
        return CheckResult(False, f"benchmark failed: {type(exc).__name__}: {exc}")
    detail: dict[str, object] = {"p50_ms": round(lat.p50_ms, 4), "p95_ms": round(lat.p95_ms, 4)}
    if max_p95_ms is not None and lat.p95_ms > max_p95_ms:
        return CheckResult(
            False, f"p95 {lat.p95_ms:.3f} ms exceeds the budget {max_p95_ms:g} ms", lat, detail
        )
    if current is not None and isinstance(current[1], GoldenSet) and max_regression_pct is not None:
        try:
            cur = benchmark(current[0], current[1], runs, per_run)
        except (EdgefleetError, Exception) as exc:
            cur = None
            detail["current_error"] = str(exc)
        if cur is not None:
            detail["current_p95_ms"] = round(cur.p95_ms, 4)
            if p95_regressed(lat.p95_ms, cur.p95_ms, max_regression_pct, slack_ms):
                return CheckResult(
                    False,
                    f"p95 {lat.p95_ms:.3f} ms is more than {max_regression_pct:g}% (+{slack_ms:g} ms) "
                    f"worse than the current model's {cur.p95_ms:.3f} ms",
                    lat,
                    detail,
                )
    return CheckResult(True, "", lat, detail, golden)


def _check_llm(
    session: InferenceSession,
    inst: Installed,
    golden: GoldenPrompts,
    runs: int,
    slack_ms: float,
    current: tuple[InferenceSession, AnyGolden] | None,
    tick: Callable[[], None] | None,
) -> CheckResult:
    if not isinstance(session, GeneratorSession):
        return CheckResult(False, "self-test failed: golden prompts need a text-generation model")
    cur = None
    if current is not None:
        cur_session, cur_golden = current
        if isinstance(cur_session, GeneratorSession) and isinstance(cur_golden, GoldenPrompts):
            cur = (cur_session.generator, cur_golden)
    res = selftest_llm.check_candidate(session.generator, inst, golden, runs, slack_ms, cur, tick)
    if not res.ok:
        return CheckResult(False, res.reason, None, res.detail)
    return CheckResult(True, "", None, res.detail, golden)
