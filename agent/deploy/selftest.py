"""On-device checks before activation: golden self-test and a short latency benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.protocol.golden import GoldenSet, self_test
from agent.protocol.states import p95_regressed
from agent.runtime import InferenceSession, load_session
from agent.store.versions import Installed
from agent.telemetry.latency import p50_p95_p99

# Untimed calls before a benchmark's measured runs (first-call allocations, caches).
WARMUP_RUNS = 3


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
    golden: GoldenSet | None = None  # the candidate's golden set, loaded once for the check


def load(
    inst: Installed, threads: int, providers: tuple[str, ...] = ("CPUExecutionProvider",)
) -> InferenceSession:
    return load_session(
        inst.manifest.runtime,
        inst.dir / inst.manifest.model.file,
        threads=threads,
        providers=providers,
    )


def golden_of(inst: Installed) -> GoldenSet:
    return GoldenSet.load(inst.dir / inst.manifest.golden.file)


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
    return _latency(times)


def golden_check(session: InferenceSession, inst: Installed, golden: GoldenSet) -> str | None:
    """None when the golden self-test passes, else the reason."""
    res = self_test(session, golden, inst.manifest.golden, inst.manifest.task == "classification")
    return None if res.ok else (res.reason or "golden self-test failed")


def check_candidate(
    session: InferenceSession,
    inst: Installed,
    runs: int,
    max_p95_ms: float | None,
    max_regression_pct: float | None,
    slack_ms: float,
    current: tuple[InferenceSession, GoldenSet] | None,
    tick: Callable[[], None] | None = None,
) -> CheckResult:
    """Golden self-test, then the latency budget and regression checks. ``tick`` is called after
    every benchmark run (the agent pings systemd's watchdog from it during a long self-test)."""
    per_run = None if tick is None else (lambda _ms: tick())
    try:
        golden = golden_of(inst)
    except (OSError, ValueError) as exc:
        return CheckResult(False, f"golden vectors unreadable: {exc}")
    problem = golden_check(session, inst, golden)
    if problem is not None:
        return CheckResult(False, f"self-test failed: {problem}")
    # A burst of load on a shared device can inflate one measurement: a latency verdict is
    # measured twice (side by side with the current model) before it rejects the candidate.
    for attempt in (1, 2):
        try:
            lat, cur, cur_error = measure(session, golden, current, runs, per_run)
        except Exception as exc:  # a runtime's own error types
            return CheckResult(False, f"benchmark failed: {type(exc).__name__}: {exc}")
        detail: dict[str, object] = {
            "p50_ms": round(lat.p50_ms, 4),
            "p95_ms": round(lat.p95_ms, 4),
            "latency_attempts": attempt,
        }
        if cur is not None:
            detail["current_p95_ms"] = round(cur.p95_ms, 4)
        if cur_error is not None:
            detail["current_error"] = cur_error
        slow = latency_problem(lat, cur, max_p95_ms, max_regression_pct, slack_ms)
        if slow is None:
            return CheckResult(True, "", lat, detail, golden)
        if attempt == 2:
            return CheckResult(False, slow, lat, detail)
    raise AssertionError("unreachable")


def measure(
    session: InferenceSession,
    golden: GoldenSet,
    current: tuple[InferenceSession, GoldenSet] | None,
    runs: int,
    record: Callable[[float], None] | None,
) -> tuple[Latency, Latency | None, str | None]:
    """The candidate's latency and, when there is one, the current model's, measured run by run
    in turn (candidate, current, candidate, ...) so both see the same load: measuring one after
    the other let a burst that hit only the candidate's turn read as a regression."""
    if current is None:
        return benchmark(session, golden, runs, record), None, None
    feeds, cur_feeds = golden.bench_feed(), current[1].bench_feed()
    try:
        for _ in range(WARMUP_RUNS):
            current[0].infer(cur_feeds)
    except Exception as exc:  # the current model cannot be measured: judge the candidate alone
        return benchmark(session, golden, runs, record), None, str(exc)
    for _ in range(WARMUP_RUNS):
        session.infer(feeds)
    mine: list[float] = []
    theirs: list[float] = []
    for _ in range(runs):
        mine.append(_timed(session, feeds, record))
        try:
            theirs.append(_timed(current[0], cur_feeds, record))
        except Exception as exc:  # the current model broke mid-way: judge the candidate alone
            return benchmark(session, golden, runs, record), None, str(exc)
    return _latency(mine), _latency(theirs), None


def _timed(
    session: InferenceSession,
    feeds: dict[str, npt.NDArray[np.generic]],
    record: Callable[[float], None] | None,
) -> float:
    t0 = time.perf_counter()
    session.infer(feeds)
    ms = (time.perf_counter() - t0) * 1000.0
    if record is not None:
        record(ms)
    return ms


def _latency(times: list[float]) -> Latency:
    p50, p95, p99 = p50_p95_p99(times)
    return Latency(p50, p95, len(times), p99, max(times))


def latency_problem(
    lat: Latency,
    cur: Latency | None,
    max_p95_ms: float | None,
    max_regression_pct: float | None,
    slack_ms: float,
) -> str | None:
    """Why the candidate's latency fails the budget or the regression rule, or None."""
    if max_p95_ms is not None and lat.p95_ms > max_p95_ms:
        return f"p95 {lat.p95_ms:.3f} ms exceeds the budget {max_p95_ms:g} ms"
    if (
        cur is not None
        and max_regression_pct is not None
        and p95_regressed(lat.p95_ms, cur.p95_ms, max_regression_pct, slack_ms)
    ):
        return (
            f"p95 {lat.p95_ms:.3f} ms is more than {max_regression_pct:g}% (+{slack_ms:g} ms) "
            f"worse than the current model's {cur.p95_ms:.3f} ms"
        )
    return None
