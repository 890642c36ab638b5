"""Inference latency since the last telemetry message, in bounded memory.

Every served inference (HTTP endpoint, in-process API) calls ``LatencyRecorder.record``; a
benchmark command's and the self-test's runs do not (they are not traffic, and the canary gate
reads these figures). The telemetry loop calls ``window`` once per interval, which returns the
figures and starts a new window. Percentiles come from a fixed-size uniform reservoir (Vitter's algorithm R), so
memory stays constant however many inferences run; count, errors and max are exact.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESERVOIR = 2048


def p50_p95_p99(ms: Sequence[float]) -> tuple[float, float, float]:
    """The 50th, 95th and 99th percentiles (numpy's linear interpolation) of a non-empty sample."""
    p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(ms), [50, 95, 99]))
    return p50, p95, p99


@dataclass(frozen=True)
class WindowStats:
    count: int
    errors: int
    seconds: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def throughput_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


class LatencyRecorder:
    """Thread-safe: ``record`` is called from request threads, ``window`` from the reporter."""

    def __init__(self, size: int = RESERVOIR, seed: int | None = None) -> None:
        self._size = size
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self._sample: list[float] = []
        self._count = 0
        self._errors = 0
        self._max = 0.0
        self._start = now

    def record(self, ms: float) -> None:
        with self._lock:
            self._count += 1
            if ms > self._max:
                self._max = ms
            if len(self._sample) < self._size:
                self._sample.append(ms)
            else:
                j = self._rng.randrange(self._count)
                if j < self._size:
                    self._sample[j] = ms

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    def window(self) -> WindowStats:
        """The figures since the previous call; starts a new window."""
        now = time.monotonic()
        with self._lock:
            sample, count, errors, mx, start = (
                self._sample,
                self._count,
                self._errors,
                self._max,
                self._start,
            )
            self._reset(now)
        if count == 0:
            return WindowStats(0, errors, now - start, None, None, None, None)
        p50, p95, p99 = p50_p95_p99(sample)
        return WindowStats(count, errors, now - start, p50, p95, p99, mx)
