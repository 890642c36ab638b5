"""The monitor of one loaded model: bins what it serves, scores drift per telemetry window.

``offer`` is called after every successful inference (LocalModel and the HTTP endpoint). It
observes a systematic sample of the calls, sized so that observing costs at most
``max_overhead`` of the inference time (a 6 us model is observed every ~10th call, a 5 ms
model on every call): the cost target holds on any model and the histograms stay unbiased.
``window`` (telemetry thread) turns the counts into the telemetry ``monitor`` block and starts
again from zero; a drift episode's start and end are queued as events (``take_events``).
Memory is fixed: counts per bin and a few scalars, no values are kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.monitor.drift import END_RATIO, Episode, js, psi
from agent.monitor.privacy import laplace, laplace_scalar
from agent.monitor.sketch import Histogram

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
MAX_SKIP = 1000  # observe at least one call in this many
MAX_CLASS_ROWS = 256  # class statistics of one call: at most this many rows (the first ones)


class Monitor:
    def __init__(
        self,
        reference: dict[str, Any],
        *,
        threshold: float | None = None,
        windows: int | None = None,
        min_count: int | None = None,
        max_overhead: float = 0.05,
        dp_epsilon: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        d = reference.get("defaults", {})
        self.threshold = float(
            threshold if threshold is not None else d.get("drift_threshold", 0.25)
        )
        self.episode = Episode(
            self.threshold,
            int(windows if windows is not None else d.get("drift_windows", 2)),
            int(min_count if min_count is not None else d.get("min_count", 50)),
        )
        self.budget = max_overhead
        # Differential privacy of the released window (agent.monitor.privacy); None: off.
        self.dp_epsilon = dp_epsilon
        self._rng = rng or np.random.default_rng()
        self.inputs = {k: Histogram.of(v["hist"]) for k, v in reference.get("inputs", {}).items()}
        self.outputs = {k: Histogram.of(v["hist"]) for k, v in reference.get("outputs", {}).items()}
        cls = reference.get("classes")
        self.class_output: str | None = cls["output"] if cls else None
        self.class_ref = np.asarray(cls["distribution"], np.float64) if cls else np.zeros(0)
        self.probabilities = bool(cls and cls.get("probabilities"))
        self.low_confidence = float(d.get("low_confidence", cls["low_confidence"])) if cls else 0.0
        self._lock = threading.Lock()
        self._skip = 1
        self._cost = 0.0
        self._failed = False
        self.events: list[dict[str, Any]] = []
        self._reset()

    @classmethod
    def load(cls, path: Path, **kw: Any) -> Monitor | None:
        """The monitor for a reference.json; None (logged) when it cannot be read."""
        try:
            return cls(json.loads(path.read_bytes()), **kw)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("drift monitoring off: reference %s unreadable: %s", path, exc)
            return None

    def _reset(self) -> None:
        self.count = 0
        self.non_finite = 0
        self.classes = np.zeros(self.class_ref.size, np.int64)
        self.conf_sum = 0.0
        self.low = 0

    # -- request threads ----------------------------------------------------------------------
    def offer(self, feeds: Arrays, outputs: Arrays, infer_s: float) -> None:
        """After a successful inference that took ``infer_s``: observe it, or skip it while the
        sampling keeps the monitor's cost under ``max_overhead`` of inference time."""
        self._skip -= 1
        if self._skip > 0:
            return
        t0 = time.perf_counter()
        try:
            self.observe(feeds, outputs)
        except Exception:  # an odd tensor must never fail the inference that was served
            if not self._failed:
                log.exception("drift monitor: observing an inference failed")
            self._failed = True
        cost = time.perf_counter() - t0
        # A moving average of the cost, each sample capped at twice it: one call descheduled
        # for milliseconds must not stop observing for a thousand calls.
        c = self._cost
        self._cost = cost if not c else 0.8 * c + 0.2 * min(cost, 2 * c)
        self._skip = min(MAX_SKIP, int(self._cost / (self.budget * max(infer_s, 1e-7))) + 1)

    def observe(self, feeds: Arrays, outputs: Arrays) -> None:
        """Bin one inference's inputs and outputs (samples on axis 0)."""
        lock = self._lock
        lock.acquire()
        try:
            for name, h in self.inputs.items():
                a = feeds.get(name)
                if a is not None:
                    h.add(np.asarray(a))
            rows = 1
            for name, h in self.outputs.items():
                a = outputs.get(name)
                if a is None:
                    continue
                h.add(a)
                rows = a.shape[0] if a.ndim > 1 else 1
                if not np.isfinite(a).all():
                    bad = ~np.isfinite(a.reshape(rows, -1)).all(axis=1)
                    self.non_finite += int(bad.sum())
            self.count += rows
            if self.class_output is not None:
                self._observe_classes(outputs.get(self.class_output))
        finally:
            lock.release()

    def _observe_classes(self, out: npt.NDArray[Any] | None) -> None:
        k = self.class_ref.size
        if out is None or out.size == 0 or out.shape[-1] != k:
            return
        y = out.reshape(-1, k)[:MAX_CLASS_ROWS]
        top = y.max(axis=1, keepdims=True)
        # top-1 probability of logits without the full softmax: 1 / sum(exp(y - max))
        top1 = top[:, 0] if self.probabilities else 1.0 / np.exp(y - top).sum(axis=1)
        self.classes += np.bincount(y.argmax(axis=1), minlength=k)
        self.conf_sum += float(top1.sum())
        self.low += int((top1 < self.low_confidence).sum())

    # -- telemetry thread ---------------------------------------------------------------------
    def window(self) -> dict[str, Any] | None:
        """The telemetry ``monitor`` block since the last call (None when nothing was observed)."""
        with self._lock:
            n, nf, cc, conf, low = (
                self.count,
                self.non_finite,
                self.classes,
                self.conf_sum,
                self.low,
            )
            ins = {k: h.take() for k, h in self.inputs.items()}
            outs = {k: h.take() for k, h in self.outputs.items()}
            self._reset()
        if n == 0:
            return None
        if self.dp_epsilon is not None:
            n, nf, cc, conf, low, ins, outs = self._noised(n, nf, cc, conf, low, ins, outs)
        drift: dict[str, Any] = {}
        scores: list[tuple[float, str]] = []
        for key, label, hists, counts in (
            ("inputs", "input", self.inputs, ins),
            ("outputs", "output", self.outputs, outs),
        ):
            got = {k: round(psi(hists[k].ref, c), 6) for k, c in counts.items() if c.sum()}
            if got:
                drift[key] = got
                scores += [(v, f"{label} {k} PSI") for k, v in got.items()]
        block: dict[str, Any] = {"count": n, "metric": "psi"}
        if self.dp_epsilon is not None:
            block["dp_epsilon"] = self.dp_epsilon  # the counts below carry Laplace noise
        if self.class_output is not None and cc.sum():
            drift["classes"] = round(js(self.class_ref, cc), 6)
            scores.append((drift["classes"], "classes JS"))
            rows = int(cc.sum())
            block["classes"] = {str(i): int(c) for i, c in enumerate(cc) if c}
            block["mean_confidence"] = round(min(1.0, conf / rows), 4)
            block["low_confidence_rate"] = round(min(1.0, low / rows), 4)
        top, what = max(scores, default=(0.0, "max score"))
        drift["max"] = top
        block["drift"] = drift
        block["non_finite"] = nf
        change = self.episode.update(n, top)
        if change is not None:
            self.events.append(self._event(change, what, top, drift))
        block["drifting"] = self.episode.drifting
        return block

    def _noised(
        self,
        n: int,
        nf: int,
        cc: npt.NDArray[np.int64],
        conf: float,
        low: int,
        ins: dict[str, npt.NDArray[np.int64]],
        outs: dict[str, npt.NDArray[np.int64]],
    ) -> tuple[
        int,
        int,
        npt.NDArray[np.int64],
        float,
        int,
        dict[str, npt.NDArray[np.int64]],
        dict[str, npt.NDArray[np.int64]],
    ]:
        """Every released count with Laplace noise (scale 1/epsilon), clipped at 0; the scores
        are computed from these, so they and the episode events are covered too."""
        eps, rng = self.dp_epsilon, self._rng

        def noisy(c: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
            return np.rint(laplace(c, eps, rng)).astype(np.int64)

        return (
            max(1, round(laplace_scalar(n, eps, rng))),
            round(laplace_scalar(nf, eps, rng)),
            noisy(cc),
            laplace_scalar(conf, eps, rng),
            round(laplace_scalar(low, eps, rng)),
            {k: noisy(c) for k, c in ins.items()},
            {k: noisy(c) for k, c in outs.items()},
        )

    def _event(self, change: str, what: str, top: float, drift: dict[str, Any]) -> dict[str, Any]:
        t, w = self.threshold, self.episode.windows
        if change == "start":
            reason = f"drift: {what} {top:.2f} > {t:g} ({w} windows)"
        else:
            reason = f"drift ended: max score {top:.2f} < {t * END_RATIO:g} ({w} windows)"
        return {"reason": reason, "detail": {"scores": drift, "threshold": t, "windows": w}}

    def take_events(self) -> list[dict[str, Any]]:
        ev, self.events = self.events, []
        return ev

    @property
    def nbytes(self) -> int:
        """Bytes of the monitor's arrays (sketches and class counts)."""
        hs = [*self.inputs.values(), *self.outputs.values()]
        return sum(h.nbytes for h in hs) + int(self.classes.nbytes + self.class_ref.nbytes)
