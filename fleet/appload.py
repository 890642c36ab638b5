"""The demo's "application": a bounded stream of v2 infer requests to each agent's local endpoint.

Devices in a fleet run a model because something calls it; this plays that part so the agents'
telemetry carries real latency windows and the demo can show that no request fails while models
are rolled out and swapped. One thread per device, a keep-alive connection, a fixed modest rate,
a cap on requests and on time. Like an application behind a readiness probe, it asks
GET /v2/health/ready until the device has a model (503, or no listener while the agent starts, are
counted apart as not ready), then sends infer requests; after that, every non-200 is a failure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass
class AppStats:
    """What one device's application saw."""

    requests: int = 0
    ok: int = 0
    correct: int = 0  # answers whose top-1 class matches the sample's label
    not_ready: int = 0  # readiness probes answered 503 or refused before the device had a model
    failed: int = 0  # anything but 200 after the first answer (connection errors included)
    ready_s: float | None = None  # seconds after the start when the device first said it was ready
    last_error: str | None = None


class AppLoad:
    """Per device, POST /v2/models/MODEL/infer at ``rate`` per second until ``stop`` or a bound."""

    def __init__(
        self,
        endpoints: dict[str, int],
        samples: Path,
        model: str = "digits",
        rate: float = 25.0,
        max_seconds: float = 300.0,
        timeout: float = 5.0,
    ) -> None:
        with np.load(samples) as d:
            self._x = np.asarray(d["x"], np.float32)
            self._y = np.asarray(d["y"], np.int64)
        self.endpoints, self.model, self.rate = endpoints, model, rate
        self.max_seconds, self.timeout = max_seconds, timeout
        self.max_requests = int(rate * max_seconds) + 1
        self.stats = {d: AppStats() for d in endpoints}
        # shift(): the devices named get transformed inputs (the world changed), with labels
        self._shifted: dict[str, npt.NDArray[np.float32]] = {}
        self._labels: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    def start(self) -> AppLoad:
        self._t0 = time.monotonic()
        for dev, port in self.endpoints.items():
            t = threading.Thread(target=self._run, args=(dev, port), name=f"app-{dev}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 1.0)

    def __enter__(self) -> AppLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def shift(
        self,
        devices: list[str],
        transform: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
        send_labels: bool = True,
    ) -> None:
        """From now on the ``devices``' application sends ``transform``ed inputs (a new camera,
        a new season) and, with ``send_labels``, each sample's label as the v2 request
        parameter ``label`` (what an application that learns the truth later would send)."""
        xs = np.asarray(transform(self._x), np.float32)
        for d in devices:
            self._shifted[d] = xs
            if send_labels:
                self._labels.add(d)

    def _body(self, dev: str, i: int) -> bytes:
        k = i % len(self._x)
        x = self._shifted.get(dev, self._x)[k][None]
        doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "data": [round(float(v), 4) for v in x.ravel()],
                }
            ]
        }
        if dev in self._labels:
            doc["parameters"] = {"label": int(self._y[k])}
        return json.dumps(doc).encode()

    def _run(self, dev: str, port: int) -> None:
        st = self.stats[dev]
        path = f"/v2/models/{self.model}/infer"
        conn: http.client.HTTPConnection | None = None
        base, end = self._t0, self._t0 + self.max_seconds
        i = n = 0
        while not self._stop.is_set() and i < self.max_requests and time.monotonic() < end:
            now = time.monotonic()
            if base + n / self.rate < now - 1.0:  # fell behind (a slow answer): no catch-up burst
                base, n = now, 0
            if self._stop.wait(max(0.0, base + n / self.rate - now)):
                break
            i, n = i + 1, n + 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
            ready = st.ready_s is not None
            if ready:
                st.requests += 1
            try:
                if ready:
                    conn.request(
                        "POST", path, self._body(dev, i), {"Content-Type": "application/json"}
                    )
                else:  # a probe, not an infer: the agent counts an infer it cannot answer as an error
                    conn.request("GET", "/v2/health/ready")
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                self._miss(st, f"{type(exc).__name__}: {exc}", probe=not ready)
                continue
            if status == 200 and not ready:
                st.ready_s = round(time.monotonic() - self._t0, 2)
            elif status == 200:
                st.ok += 1
                st.correct += self._is_correct(body, i)
            else:
                self._miss(
                    st, f"HTTP {status}: {body[:200].decode(errors='replace')}", probe=not ready
                )
        if conn is not None:
            conn.close()

    @staticmethod
    def _miss(st: AppStats, why: str, probe: bool) -> None:
        if probe:
            st.not_ready += 1
        else:
            st.failed += 1
            st.last_error = why

    def _is_correct(self, body: bytes, i: int) -> int:
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            logits = json.loads(body)["outputs"][0]["data"]
            return int(int(np.argmax(logits)) == int(self._y[i % len(self._y)]))
        return 0

    def summary(self) -> dict[str, Any]:
        per = {d: asdict(s) for d, s in sorted(self.stats.items())}
        tot = {
            k: sum(s[k] for s in per.values())
            for k in ("requests", "ok", "correct", "not_ready", "failed")
        }
        return {**tot, "rate_per_device": self.rate, "devices": per}


def describe(s: dict[str, Any]) -> str:
    """One line for people from ``AppLoad.summary()``."""
    return (
        f"application: {s['requests']} infer requests ({s['rate_per_device']:g}/s per device), {s['ok']} answered "
        f"({s['correct']} correct), {s['not_ready']} readiness probes answered 'no model yet', "
        f"{s['failed']} failed once a model was active"
    )
