"""Text-generation figures since the last telemetry message, in bounded memory.

Every generation the endpoint runs calls ``GenRecorder.finished`` once; the queue calls
``queued``/``rejected``. ``window`` returns the figures and starts a new window, like
``LatencyRecorder``. Decode speed is tokens after the first over the time from the first token
to the last (prefill is in TTFT), summed over the window's generations, so one long answer and
many short ones weigh by their tokens. TTFT is measured from when a generation got its slot, so
it is the model's figure and not the queue's (the queue shows in ``queue_max``).
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from agent.telemetry.latency import RESERVOIR, p50_p95_p99


@dataclass(frozen=True)
class GenWindow:
    requests: int  # generations that produced at least one token or finished
    tokens: int
    tok_s: float | None  # decode tokens per second; None without a generation of 2+ tokens
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    queue_max: int
    rejected: int  # 503: queue full or waited past the deadline
    errors: int
    cancelled: int  # the client went away mid-generation

    def as_dict(self) -> dict[str, float | int]:
        """The telemetry block: absent figures left out."""
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        for k in ("tok_s", "ttft_p50_ms", "ttft_p95_ms"):
            if k in d:
                d[k] = round(float(d[k]), 3)
        return d


class GenRecorder:
    """Thread-safe: request threads record, the reporter takes windows."""

    def __init__(self, size: int = RESERVOIR, seed: int | None = None) -> None:
        self._size = size
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._depth = 0
        self._reset()

    def _reset(self) -> None:
        self._ttft: list[float] = []
        self._seen = 0
        self._requests = self._tokens = self._rejected = self._errors = self._cancelled = 0
        self._decode_tokens = 0
        self._decode_s = 0.0
        self._queue_max = self._depth

    def queued(self, depth: int) -> None:
        """The number of requests waiting for a slot is now ``depth``."""
        with self._lock:
            self._depth = depth
            self._queue_max = max(self._queue_max, depth)

    def rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    def finished(
        self, tokens: int, ttft_s: float | None, decode_s: float, cancelled: bool = False
    ) -> None:
        """One generation ended: its token count, time to first token and the time from the
        first token to the last."""
        with self._lock:
            self._requests += 1
            self._tokens += tokens
            self._cancelled += int(cancelled)
            if tokens > 1 and decode_s > 0:
                self._decode_tokens += tokens - 1
                self._decode_s += decode_s
            if ttft_s is None:
                return
            ms = ttft_s * 1000.0
            self._seen += 1
            if len(self._ttft) < self._size:
                self._ttft.append(ms)
            else:
                j = self._rng.randrange(self._seen)
                if j < self._size:
                    self._ttft[j] = ms

    def window(self) -> GenWindow | None:
        """The figures since the previous call (None when nothing happened); a new window starts."""
        with self._lock:
            ttft, seen = self._ttft, self._seen
            w = GenWindow(
                requests=self._requests,
                tokens=self._tokens,
                tok_s=self._decode_tokens / self._decode_s if self._decode_s > 0 else None,
                ttft_p50_ms=None,
                ttft_p95_ms=None,
                queue_max=self._queue_max,
                rejected=self._rejected,
                errors=self._errors,
                cancelled=self._cancelled,
            )
            self._reset()
        if not (w.requests or w.rejected or w.errors or w.queue_max):
            return None
        if seen:
            p50, p95, _ = p50_p95_p99(ttft)
            w = GenWindow(**{**w.__dict__, "ttft_p50_ms": p50, "ttft_p95_ms": p95})
        return w
