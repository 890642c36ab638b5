"""Feedback capture: a bounded, opt-in sample of served inferences, sent on devices/{id}/samples.

Off unless [capture] enabled = true in the config, or a signed deployment carries ``capture``
keys for the model it deploys (they override the config's for that model). ``offer`` runs after
every served inference (request threads): when capture is off it costs one dict lookup. A
sample is taken when a trigger fires (a random ``sample_rate`` draw, a top-1 probability below
the reference's low-confidence threshold, a drift episode, a label from the application), then
the redaction hook runs, then the hourly caps, and only then is anything queued: on disk
(STATE_DIR/samples, bounded by queue_max_bytes, oldest dropped first and counted) and sent QoS 1
by a publisher thread, like telemetry, across restarts and outages.

For labels that come later (POST /v2/models/{name}/feedback), the last RING_MAX requests that
carried an id are kept in memory (at most RING_MAX_BYTES of tensors): nothing is written or sent
for them unless a label arrives while they are still there.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import random
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.protocol import topics
from agent.protocol.capture import CaptureConfig
from agent.protocol.messages import ActiveModel, Deployment, Sample, SampleTensor, SampleTrigger
from agent.serve.holder import Loaded
from agent.telemetry.buffer import TelemetryBuffer
from agent.telemetry.sender import BufferedSender
from agent.transport.base import Transport

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
Hook = Callable[[Arrays, Arrays], "tuple[Arrays, Arrays] | None"]
RING_MAX = 256  # requests kept for a later label
RING_MAX_BYTES = 16 * 1024 * 1024
HOUR_S = 3600.0


def settings_for(cfg: CaptureConfig, override: dict[str, Any] | None) -> CaptureConfig:
    """The config's [capture] with a deployment's keys over it. Keys in a deployment turn capture
    on unless they say ``enabled: false``; they cannot remove the device's redaction hook, nor
    change queue_max_bytes (the device's disk). Invalid keys: the config's settings, logged."""
    if override is None:
        return cfg
    doc = {"enabled": True, **override}
    doc.pop("queue_max_bytes", None)
    if doc.get("redact") is None:
        doc.pop("redact", None)
    try:
        return CaptureConfig.model_validate({**cfg.model_dump(), **doc})
    except ValidationError as exc:
        log.warning("deployment's capture keys ignored: %s", exc.errors()[0]["msg"])
        return cfg


def load_hook(spec: str) -> Hook:
    """The redaction function named by 'file.py:function'."""
    path, fn = spec.rsplit(":", 1)
    mspec = importlib.util.spec_from_file_location(f"edgefleet_redact_{abs(hash(path))}", path)
    if mspec is None or mspec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    hook = getattr(mod, fn)
    if not callable(hook):
        raise TypeError(f"{spec} is not callable")
    return hook  # type: ignore[no-any-return]


def tensor(a: npt.NDArray[Any]) -> SampleTensor:
    """``a`` as raw little-endian, C-order bytes in base64."""
    arr = np.ascontiguousarray(a)
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return SampleTensor(
        dtype=str(arr.dtype), shape=list(arr.shape), data=base64.b64encode(le.tobytes()).decode()
    )


def top1_low(loaded: Loaded, outputs: Arrays) -> bool:
    """A classifier's top-1 probability (any row) is below the reference's threshold."""
    mon = loaded.monitor
    if mon is None or mon.class_output is None or mon.low_confidence <= 0:
        return False
    out = outputs.get(mon.class_output)
    k = mon.class_ref.size
    if out is None or out.size == 0 or out.shape[-1] != k:
        return False
    y = np.asarray(out, np.float64).reshape(-1, k)[:256]
    top = y.max(axis=1, keepdims=True)
    p = top[:, 0] if mon.probabilities else 1.0 / np.exp(y - top).sum(axis=1)
    return bool((p < mon.low_confidence).any())


class Capture:
    """One per agent: triggers, caps, the redaction hook, the queue and its counters."""

    def __init__(
        self,
        cfg: AgentConfig,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg, self.device = cfg.capture, cfg.device_id
        self.topic = topics.device_topic(cfg.device_id, "samples")
        self.dir = cfg.state_dir / "samples"
        self.rand, self.clock = rand, clock
        self._lock = threading.Lock()
        self._override: tuple[str, dict[str, Any] | None] = ("", None)
        self._settings: dict[str, CaptureConfig] = {}
        self._hooks: dict[str, Hook | None] = {}
        self._hour: deque[tuple[float, int]] = deque()  # (time, bytes) of samples queued
        self._ring: OrderedDict[str, tuple[Loaded, Arrays, Arrays, int]] = OrderedDict()
        self._ring_bytes = 0
        self.queue: TelemetryBuffer | None = None
        self.on = cfg.capture.enabled  # reported in telemetry once it was ever on
        self.captured = self.dropped = self.redaction_errors = 0
        self.wake = threading.Event()
        if self.on or (self.dir / "samples.sqlite").exists():
            self._open()

    def _open(self) -> TelemetryBuffer:
        if self.queue is None:
            self.queue = TelemetryBuffer(
                self.dir, 10_000_000, max_bytes=self.cfg.queue_max_bytes, name="samples.sqlite"
            )
        return self.queue

    # -- worker thread ---------------------------------------------------------------------------
    def deployment(self, dep: Deployment | None) -> None:
        """The desired deployment: its ``capture`` keys apply to the model with its sha256."""
        new = ("", None) if dep is None else (dep.sha256, dep.capture)
        if new != self._override:
            self._override, self._settings = new, {}

    def settings(self, sha256: str) -> CaptureConfig:
        s = self._settings.get(sha256)
        if s is None:
            sha, keys = self._override
            s = settings_for(self.cfg, keys if sha == sha256 else None)
            self._settings[sha256] = s
            if s.enabled:
                self.on = True
        return s

    # -- request threads ---------------------------------------------------------------------------
    def offer(
        self,
        loaded: Loaded,
        feeds: Arrays,
        outputs: Arrays,
        request_id: str | None = None,
        label: Any = None,
    ) -> None:
        """After a served inference: capture it if a trigger fires (never raises)."""
        s = self._settings.get(loaded.sha256) or self.settings(loaded.sha256)
        if not s.enabled:
            return
        try:
            trig = s.triggers
            trigger: SampleTrigger
            if label is not None and "label" in trig:
                trigger = "label"
            elif "low_confidence" in trig and top1_low(loaded, outputs):
                trigger = "low_confidence"
            elif "drift" in trig and loaded.monitor is not None and loaded.monitor.episode.drifting:
                trigger = "drift"
            elif "sample" in trig and s.sample_rate > 0 and self.rand() < s.sample_rate:
                trigger = "sample"
            else:
                if request_id is not None and "label" in trig:
                    self._remember(request_id, loaded, feeds, outputs)
                return
            self._capture(s, loaded, trigger, feeds, outputs, request_id, label)
        except Exception:  # a capture problem must never fail the inference that was served
            log.exception("capture: a sample failed")
            with self._lock:
                self.dropped += 1

    def feedback(self, request_id: str, label: Any) -> bool:
        """A label for an earlier request; False when it is no longer (or never was) kept."""
        with self._lock:
            got = self._ring.pop(request_id, None)
            if got is not None:
                self._ring_bytes -= got[3]
        if got is None:
            return False
        loaded, feeds, outputs, _ = got
        s = self.settings(loaded.sha256)
        if s.enabled and "label" in s.triggers:
            self._capture(s, loaded, "label", feeds, outputs, request_id, label)
        return True

    def _remember(self, rid: str, loaded: Loaded, feeds: Arrays, outputs: Arrays) -> None:
        n = sum(a.nbytes for a in feeds.values()) + sum(a.nbytes for a in outputs.values())
        if n > RING_MAX_BYTES:
            return
        with self._lock:
            old = self._ring.pop(rid, None)
            if old is not None:
                self._ring_bytes -= old[3]
            self._ring[rid] = (loaded, feeds, outputs, n)
            self._ring_bytes += n
            while len(self._ring) > RING_MAX or self._ring_bytes > RING_MAX_BYTES:
                self._ring_bytes -= self._ring.popitem(last=False)[1][3]

    def _hook(self, spec: str) -> Hook | None:
        if spec not in self._hooks:
            try:
                self._hooks[spec] = load_hook(spec)
            except Exception as exc:  # every sample is then dropped: never sent unredacted
                log.error("capture: redaction hook %s does not load: %s", spec, exc)
                self._hooks[spec] = None
        return self._hooks[spec]

    def _capture(
        self,
        s: CaptureConfig,
        loaded: Loaded,
        trigger: SampleTrigger,
        feeds: Arrays,
        outputs: Arrays,
        rid: str | None,
        label: Any,
    ) -> None:
        now = self.clock()
        with self._lock:
            while self._hour and self._hour[0][0] <= now - HOUR_S:
                self._hour.popleft()
            if len(self._hour) >= s.max_per_hour:
                self.dropped += 1
                return
        redacted = s.redact is not None
        if s.redact is not None:
            hook = self._hook(s.redact)
            try:
                if hook is None:
                    raise RuntimeError("redaction hook not loaded")
                kept = hook(dict(feeds), dict(outputs))
            except Exception as exc:
                log.warning("capture: redaction hook failed, sample dropped: %s", exc)
                with self._lock:
                    self.redaction_errors += 1
                    self.dropped += 1
                return
            if kept is None:
                return  # the hook chose to drop it: not an error, not counted as dropped
            feeds, outputs = kept
        doc = Sample(
            device=self.device,
            seq=0,
            ts=round(now, 3),
            model=ActiveModel(name=loaded.name, version=loaded.version, sha256=loaded.sha256),
            trigger=trigger,
            request_id=rid,
            inputs=None if s.outputs_only else {k: tensor(a) for k, a in feeds.items()},
            outputs={k: tensor(a) for k, a in outputs.items()},
            label=label,
            redacted=redacted,
        ).model_dump(mode="json", exclude_none=True)
        size = len(json.dumps(doc, separators=(",", ":")))
        with self._lock:
            used = sum(b for _, b in self._hour)
            if used + size > s.max_bytes_per_hour or size > s.queue_max_bytes:
                self.dropped += 1
                return
            self._hour.append((now, size))
        try:
            q = self._open()
            res = q.reserve()
            doc["seq"] = res.seq
            q.append(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())
        except (sqlite3.Error, OSError) as exc:
            log.warning("capture: sample not queued: %s", exc)
            with self._lock:
                self.dropped += 1
            return
        with self._lock:
            self.captured += 1
            self.dropped += res.dropped  # the queue's own drops (oldest, beyond its bound)
        self.wake.set()

    # -- telemetry thread ------------------------------------------------------------------------
    def window(self) -> dict[str, int] | None:
        """The telemetry ``capture`` block since the last call; None while capture is off."""
        if not self.on:
            return None
        with self._lock:
            block = {
                "captured": self.captured,
                "dropped": self.dropped,
                "redaction_errors": self.redaction_errors,
            }
            self.captured = self.dropped = self.redaction_errors = 0
        block["queue_bytes"] = 0 if self.queue is None else self.queue.pending_bytes()
        return block


class SamplePublisher(BufferedSender):
    """The thread that sends the queued samples (QoS 1, deleted on PUBACK, in order)."""

    def __init__(self, capture: Capture, transport: Transport) -> None:
        self.capture = capture
        self.t = transport
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False

    def run(self) -> None:
        cap = self.capture
        while not self._stop.is_set():
            wait = 1.0
            try:
                if cap.queue is not None:
                    if not self._ready:
                        self.init_sender(self.t, cap.topic, cap.queue)
                        self._ready = True
                    if self.pump() > 0 and self.t.is_connected():
                        self.pump(0.05)
                        wait = 0.0
            except Exception:  # never take the agent down; try again shortly
                log.exception("sample publisher error")
            if wait:
                cap.wake.wait(wait)
                cap.wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="samples", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self.capture.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.capture.queue is not None:
            self.capture.queue.close()
