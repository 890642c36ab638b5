"""Host latency percentiles after warm-up, bounded in both iterations and time."""

from __future__ import annotations

import time
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


def measure_latency(
    session: InferenceSession, input_name: str, sample: np.ndarray, *, warmup: int = 10,
    iters: int = 200, max_seconds: float = 3.0,
) -> dict[str, Any]:
    """Time ``iters`` runs of ``sample`` (at most ``max_seconds``, at least 20 runs)."""
    feeds = {input_name: np.ascontiguousarray(sample)}
    for _ in range(warmup):
        session.infer(feeds)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 20 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        session.infer(feeds)
        times.append(time.perf_counter() - t0)
    return dict(percentiles(times), batch=int(sample.shape[0]))
