"""The telemetry reporter: its own thread, so sampling and a backlog never hold up deployments.

Each interval it builds one ``Telemetry`` message and writes it to the on-disk buffer first; it
then sends buffered messages in order while the transport is connected (a bounded number in
flight) and deletes each once the broker acknowledged it (agent.telemetry.sender: in order, at
least once; receivers drop a repeated seq).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import AgentConfig
from agent.monitor.monitor import Monitor
from agent.protocol import topics
from agent.protocol.messages import ActiveModel, GenerationWindow, LatencyWindow, Telemetry
from agent.store.space import is_disk_full
from agent.telemetry.buffer import TelemetryBuffer
from agent.telemetry.generation import GenWindow
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.power import PowerReader, WindowPower, energy_fields
from agent.telemetry.sender import BufferedSender
from agent.telemetry.thermal import ThermalReader, WindowThermal
from agent.transport.base import Transport

log = logging.getLogger(__name__)

# Thermal state is sampled this often within a window (at least 4 samples per window).
MAX_SAMPLE_S = 1.0


def sparse(doc: Any) -> Any:
    """Drop None values and empty dicts (a sensor the device lacks is absent, not null)."""
    if isinstance(doc, dict):
        out = {k: sparse(v) for k, v in doc.items() if v is not None}
        return {k: v for k, v in out.items() if v != {}}
    if isinstance(doc, list):
        return [sparse(v) for v in doc]
    return doc


def encode_telemetry(msg: Telemetry) -> bytes:
    return json.dumps(
        sparse(msg.model_dump(mode="json")), separators=(",", ":"), allow_nan=False
    ).encode()


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


def _generation(w: GenWindow | None) -> GenerationWindow | None:
    return None if w is None else GenerationWindow.model_validate(w.as_dict())


class ProcessStats:
    """This process's RSS and CPU %, and the system's available memory (psutil, when installed)."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is in the agent extra
            self._ps: Any = None
            self._proc: Any = None
            return
        self._ps, self._proc = psutil, psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # the first call only starts the measurement

    def read(self) -> dict[str, float]:
        if self._proc is None:
            return {}
        out: dict[str, float] = {}
        try:
            out["rss_mb"] = round(self._proc.memory_info().rss / 2**20, 2)
            out["cpu_percent"] = round(float(self._proc.cpu_percent(None)), 2)
            out["mem_available_mb"] = round(self._ps.virtual_memory().available / 2**20, 1)
        except (OSError, self._ps.Error):
            pass
        return out


class TelemetryReporter(BufferedSender):
    def __init__(
        self,
        cfg: AgentConfig,
        transport: Transport,
        recorder: LatencyRecorder,
        active: Callable[[], ActiveModel | None],
        thermal: ThermalReader | None = None,
        monitor: Callable[[], Monitor | None] = lambda: None,
        drift_event: Callable[[dict[str, Any]], None] = lambda ev: None,
        power: PowerReader | None = None,
        capture: Callable[[], dict[str, int] | None] = lambda: None,
        generation: Callable[[], GenWindow | None] = lambda: None,
    ) -> None:
        tc = cfg.telemetry
        self.device, self.t, self.recorder, self.active = cfg.device_id, transport, recorder, active
        self.interval = tc.interval_s
        self.topic = topics.device_topic(cfg.device_id, "telemetry")
        self.buffer = TelemetryBuffer(
            tc.buffer_dir or cfg.state_dir / "telemetry", tc.buffer_max_messages
        )
        self.thermal = thermal or ThermalReader(tc.sysfs_root)
        self.proc = ProcessStats()
        # The active model's drift monitor, and where its episode events go (the agent's worker
        # publishes them: events are numbered on the worker's sequence).
        self.monitor, self.drift_event, self.capture = monitor, drift_event, capture
        self.generation = generation
        self.started = time.monotonic()
        self.window = WindowThermal()
        self.power = power or PowerReader(tc.sysfs_root)
        # Power over the window: the first reading is a RAPL counter's starting point.
        self.power_window = WindowPower()
        self.power_window.add(self.power.read())
        self.init_sender(transport, self.topic, self.buffer)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Messages the buffer could not store (a full disk), not yet in its drop counts; and
        # drop counts a dropped message would have reported. Both go into the next message.
        self.unbuffered = 0
        self.unreported = 0

    # -- one interval -------------------------------------------------------------------------
    def sample(self) -> None:
        """A thermal and a power reading within the current window."""
        self.window.add(self.thermal.read())
        self.power_window.add(self.power.read())

    def report(self) -> Telemetry | None:
        """Build this interval's message and store it in the buffer (sent by ``pump``).

        None when the buffer cannot take it (a full disk): the message is dropped and counted,
        and the next message that is stored reports the count in ``buffer.dropped``."""
        now = self.thermal.read()
        self.window.add(now)
        self.power_window.add(self.power.read())
        w = self.recorder.window()
        # Started again with the latency window, so the energy matches the inferences it saw.
        energy = self.power_window.result(w.seconds)
        self.power_window = self.power_window.next()
        try:
            res = self.buffer.reserve(self.unbuffered)
        except (sqlite3.Error, OSError) as exc:
            self._dropped(exc)
            return None
        self.unbuffered = 0  # now in the buffer's counts (res.dropped, res.dropped_total)
        unreported, self.unreported = self.unreported, 0
        lat = LatencyWindow(
            count=w.count,
            errors=w.errors,
            throughput_per_s=round(w.throughput_per_s, 3),
            p50_ms=_round(w.p50_ms),
            p95_ms=_round(w.p95_ms),
            p99_ms=_round(w.p99_ms),
            max_ms=_round(w.max_ms),
            thermal=self.window.summary(),
        )
        self.window = WindowThermal()
        mon = self.monitor()
        block = None
        if mon is not None:
            block = mon.window()
            for ev in mon.take_events():
                self.drift_event(ev)
        stats: dict[str, Any] = {**self.proc.read(), **energy_fields(energy, w.count)}
        msg = Telemetry(
            device=self.device,
            seq=res.seq,
            ts=time.time(),
            interval_s=round(w.seconds, 3),
            uptime_s=round(time.monotonic() - self.started, 3),
            active=self.active(),
            latency=lat,
            temperatures_c=now.temperatures_c,
            throttled=now.throttled,
            throttle_detail=now.detail,
            cpu_freq_mhz=now.cpu_freq_mhz,
            buffer={
                "pending": res.pending,
                "dropped": res.dropped + unreported,
                "dropped_total": res.dropped_total,
            },
            monitor=block,
            capture=self.capture(),
            generation=_generation(self.generation()),
            **stats,
        )
        try:
            self.buffer.append(encode_telemetry(msg), keep=[f.id for f in self.inflight])
        except (sqlite3.Error, OSError) as exc:
            self.unreported += res.dropped + unreported  # what this message would have told
            self._dropped(exc)
            return None
        return msg

    def _dropped(self, exc: BaseException) -> None:
        """One message not buffered: counted (never silently lost), the reporter goes on."""
        self.unbuffered += 1
        if not is_disk_full(exc):
            log.error("telemetry buffer write failed: %s", exc)
        elif self.unbuffered == 1:
            log.warning("telemetry buffer full (disk): dropping messages, counted: %s", exc)

    # -- thread ---------------------------------------------------------------------------------
    def run(self) -> None:
        tick = min(MAX_SAMPLE_S, self.interval / 4)
        next_report = time.monotonic() + self.interval
        next_sample = time.monotonic()
        while not self._stop.is_set():
            sending = False
            try:
                now = time.monotonic()
                if now >= next_report:
                    self.report()
                    next_report += self.interval
                    if next_report < now:  # fell behind (suspended): skip, do not burst
                        next_report = now + self.interval
                    next_sample = now + tick
                elif now >= next_sample:
                    self.sample()
                    next_sample = now + tick
                sending = self.pump() > 0 and self.t.is_connected()
                wait = max(0.0, min(next_sample, next_report) - time.monotonic())
                if sending:  # a backlog drains at the broker's pace, not the tick's
                    self.pump(min(wait, 0.05))
                    continue
            except Exception:  # never take the agent down; try again next tick
                log.exception("telemetry error")
                wait = tick
            self._stop.wait(wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.unbuffered or self.unreported:  # counted in memory: kept for the next start
            try:
                self.buffer.add_dropped(self.unbuffered, self.unreported)
            except (sqlite3.Error, OSError) as exc:
                log.error(
                    "%d telemetry messages dropped (buffer unwritable) and the count not saved: %s",
                    self.unbuffered,
                    exc,
                )
        self.buffer.close()
