"""Host latency at batch 1, measured in interleaved rounds against a reference model.

A shared machine is noisy: one 3 s window of the same candidate gave p95 anywhere from 48 to
176 ms. So the candidate and the reference (the fp32 model) run in alternating rounds, and
the figures are medians over rounds of each round's percentile: a burst of load hits one
round of both, not the whole measurement of one. The candidate/reference ratio from the same
rounds is the side-by-side figure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.runtime.base import InferenceSession


def percentiles(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p95_ms": round(float(np.percentile(a, 95)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "max_ms": round(float(a.max()), 4),
        "n": len(a),
    }


def _time_runs(
    session: InferenceSession, feeds: Mapping[str, np.ndarray], runs: int, deadline: float
) -> list[float]:
    """Runs until ``deadline`` (at least 5, at most ``runs``): a fast model gets many runs a
    round, so one preemption by another process does not become its p95."""
    times: list[float] = []
    while len(times) < runs and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.infer(dict(feeds))
        times.append(time.perf_counter() - t0)
    return times


def measure_latency(
    session: InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    reference: InferenceSession | None = None,
    rounds: int = 7,
    per_round: int = 1000,
    max_seconds: float = 6.0,
    warmup: int = 5,
) -> dict[str, Any]:
    """Latency of ``feeds`` (batch 1) over ``rounds`` rounds, interleaved with ``reference``.

    ``p50_ms``/``p95_ms``/``p99_ms`` are medians over rounds of each round's percentile; with a
    reference, ``ref_p50_ms``/``ref_p95_ms`` and ``p95_ratio`` come from the same rounds.
    Bounded: each session gets an equal slot of ``max_seconds`` a round (at least 5 runs, at
    most ``per_round``), and rounds stop early once ``max_seconds`` is spent (at least 3).
    """
    sessions = [session] if reference is None else [session, reference]
    for s in sessions:
        for _ in range(warmup):
            s.infer(dict(feeds))
    start = time.perf_counter()
    slot = max_seconds / rounds / len(sessions)
    per: list[list[dict[str, float]]] = [[] for _ in sessions]
    all_times: list[float] = []
    for r in range(rounds):
        if r >= 3 and time.perf_counter() - start > max_seconds:
            break
        for i, s in enumerate(sessions):
            t = _time_runs(s, feeds, per_round, time.perf_counter() + slot)
            per[i].append(percentiles(t))
            if i == 0:
                all_times += t

    def med(i: int, key: str) -> float:
        return round(float(np.median([p[key] for p in per[i]])), 4)

    out: dict[str, Any] = {k: med(0, k) for k in ("p50_ms", "p95_ms", "p99_ms")}
    out.update(max_ms=round(max(all_times) * 1000, 4), n=len(all_times), rounds=len(per[0]))
    if reference is not None:
        out.update(ref_p50_ms=med(1, "p50_ms"), ref_p95_ms=med(1, "p95_ms"))
        ratios = [
            a["p95_ms"] / b["p95_ms"]
            for a, b in zip(per[0], per[1], strict=True)
            if b["p95_ms"] > 0
        ]
        out["p95_ratio"] = round(float(np.median(ratios)), 4) if ratios else None
    first = next(iter(feeds.values()), None)
    out["batch"] = int(first.shape[0]) if first is not None and first.ndim else 1
    return out
