"""Telemetry logic: thermal state from fixture sysfs trees, vcgencmd bits, the on-disk buffer,
latency windows, and buffer-first delivery through the in-memory transport."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.protocol.messages import ActiveModel, Telemetry, decode
from agent.telemetry.buffer import TelemetryBuffer
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.thermal import ThermalReader, parse_vcgencmd
from agent.transport.fake import FakeTransport

FIX = Path(__file__).resolve().parents[2] / "fixtures"
SYSFS = FIX / "sysfs"
VCGENCMD = str(FIX / "bin" / "vcgencmd")


def test_rpi4_tree_cool_and_not_throttled() -> None:
    s = ThermalReader(SYSFS / "rpi4", vcgencmd=None).read()
    assert s.temperatures_c == {"cpu-thermal": 61.835}
    assert s.cpu_freq_mhz == 1500.0
    assert s.throttled is False
    assert "at_trip_point" not in s.detail and "freq_cap_mhz" not in s.detail


def test_x86_tree_hot_capped_and_counting(tmp_path: Path) -> None:
    root = tmp_path / "x86"
    shutil.copytree(SYSFS / "x86-hot", root)
    r = ThermalReader(root, vcgencmd=None)
    s = r.read()
    # the zone with an unreadable temp is left out; a second zone of the same type keeps its name apart
    assert s.temperatures_c == {
        "acpitz": 27.8,
        "x86_pkg_temp": 97.0,
        "pch_cannonlake": 95.0,
        "x86_pkg_temp.thermal_zone4": 96.0,
    }
    assert s.max_temp_c == 97.0
    assert s.throttled is True
    assert s.detail["at_trip_point"] == ["pch_cannonlake:passive"]  # trip points at 0 mean "none"
    assert (s.detail["freq_cap_mhz"], s.detail["freq_hw_max_mhz"]) == (1200.0, 4600.0)
    assert s.cpu_freq_mhz == 1100.0
    assert s.detail["throttle_counts"] == {"core": 22, "package": 6}
    assert "throttle_events" not in s.detail  # no earlier reading to compare with

    # cool it down and lift the cap: only the throttle counters can still say "throttled"
    (root / "sys/class/thermal/thermal_zone2/temp").write_text("45000\n")
    for c in (0, 1):
        (root / f"sys/devices/system/cpu/cpu{c}/cpufreq/scaling_max_freq").write_text("4600000\n")
    s2 = r.read()
    assert s2.detail["throttle_events"] == 0 and s2.throttled is False
    (root / "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count").write_text("15\n")
    s3 = r.read()
    assert s3.detail["throttle_events"] == 5 and s3.throttled is True


def test_no_sensors_is_not_an_error(tmp_path: Path) -> None:
    s = ThermalReader(tmp_path, vcgencmd=None).read()
    assert (s.temperatures_c, s.throttled, s.detail, s.cpu_freq_mhz) == ({}, None, {}, None)


def test_vcgencmd_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    v = parse_vcgencmd("throttled=0x50005\n")
    assert v is not None
    assert v["raw"] == "0x50005" and v["under_voltage"] and v["throttled"] and v["throttling_now"]
    assert not v["freq_capped"] and v["under_voltage_occurred"] and v["throttled_occurred"]
    assert parse_vcgencmd('error=1 error_msg="Command not registered"') is None
    old = parse_vcgencmd("throttled=0x20000")
    assert old is not None and old["freq_capped_occurred"] and not old["throttling_now"]

    monkeypatch.setenv("VCGENCMD_THROTTLED", "0x80008")
    s = ThermalReader(SYSFS / "rpi4", vcgencmd=VCGENCMD).read()
    assert s.throttled is True and s.detail["vcgencmd"]["soft_temp_limit"] is True
    monkeypatch.setenv("VCGENCMD_THROTTLED", "0x0")
    assert ThermalReader(SYSFS / "rpi4", vcgencmd=VCGENCMD).read().throttled is False
    # a missing tool is the same as no tool
    assert "vcgencmd" not in ThermalReader(SYSFS / "rpi4", vcgencmd=str(FIX / "nope")).read().detail


def test_buffer_drops_oldest_first_and_survives_reopen(tmp_path: Path) -> None:
    b = TelemetryBuffer(tmp_path, max_messages=5)
    reported = []
    for i in range(1, 9):
        res = b.reserve()
        assert res.seq == i
        reported.append(res.dropped)
        b.append(f"m{i}".encode())
    assert [p for _, p in b.after(0, 100)] == [b"m4", b"m5", b"m6", b"m7", b"m8"]
    r = b.reserve()
    # each drop is reported once, by the next reservation after it
    assert reported == [0, 0, 0, 0, 0, 0, 1, 1] and (r.dropped, r.dropped_total, r.pending) == (
        1,
        3,
        5,
    )
    assert b.reserve().dropped == 0  # reported once
    ids = [i for i, _ in b.after(0, 100)]
    b.append(b"m11", keep=[ids[0]])  # in flight: not dropped, the next oldest goes instead
    assert [p for _, p in b.after(0, 100)] == [b"m4", b"m6", b"m7", b"m8", b"m11"]
    b.delete(ids[:1])
    b.close()
    b2 = TelemetryBuffer(tmp_path, max_messages=5)
    assert [p for _, p in b2.after(0, 100)] == [b"m6", b"m7", b"m8", b"m11"]
    r2 = b2.reserve()
    assert r2.seq == 11 and r2.dropped == 1 and r2.dropped_total == 4
    b2.close()


def _cfg(tmp: Path, root: Path, max_messages: int = 100) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": "dev1",
            "profile": "test-cpu",
            "state_dir": str(tmp / "state"),
            "root_key": str(tmp / "root.pub"),
            "telemetry": {
                "interval_s": 0.2,
                "sysfs_root": str(root),
                "buffer_max_messages": max_messages,
            },
        }
    )


def _sent(fake: FakeTransport) -> list[dict[str, Any]]:
    return [
        json.loads(p) for t, p, _ in fake.published if t == "edgefleet/v1/devices/dev1/telemetry"
    ]


def test_report_fields_and_latency_window(tmp_path: Path) -> None:
    fake = FakeTransport()
    rec = LatencyRecorder(seed=1)
    active = ActiveModel(name="tiny", version="1.0.0", sha256="a" * 64)
    rep = TelemetryReporter(
        _cfg(tmp_path, SYSFS / "x86-hot"),
        fake,
        rec,
        lambda: active,
        ThermalReader(SYSFS / "x86-hot", vcgencmd=None),
    )
    values = np.random.default_rng(0).gamma(2.0, 1.5, size=500)
    for v in values:
        rec.record(float(v))
    rec.error()
    rep.sample()
    rep.report()
    rep.pump()
    (doc,) = _sent(fake)
    msg = decode(Telemetry, json.dumps(doc).encode())  # the sparse JSON still validates
    lat = msg.latency
    assert lat.count == 500 and lat.errors == 1 and lat.throughput_per_s > 0
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    assert lat.p50_ms == pytest.approx(p50, abs=1e-3) and lat.p95_ms == pytest.approx(p95, abs=1e-3)
    assert lat.p99_ms == pytest.approx(p99, abs=1e-3) and lat.max_ms == pytest.approx(
        values.max(), abs=1e-3
    )
    assert lat.thermal == {"samples": 2, "max_temp_c": 97.0, "throttled": True}
    assert msg.active == active and msg.seq == 1 and msg.temperatures_c["x86_pkg_temp"] == 97.0
    assert msg.throttled is True and msg.cpu_freq_mhz == 1100.0
    assert msg.rss_mb is not None and msg.rss_mb > 10 and msg.mem_available_mb is not None
    assert msg.buffer == {"pending": 0, "dropped": 0, "dropped_total": 0}
    # the next window starts empty: no percentiles at all (absent, not null)
    rep.report()
    rep.pump()
    doc2 = _sent(fake)[1]
    assert doc2["latency"]["count"] == 0 and "p50_ms" not in doc2["latency"] and doc2["seq"] == 2
    rep.buffer.close()


def test_no_sensor_fields_absent(tmp_path: Path) -> None:
    fake = FakeTransport()
    rep = TelemetryReporter(
        _cfg(tmp_path, tmp_path / "empty"),
        fake,
        LatencyRecorder(),
        lambda: None,
        ThermalReader(tmp_path / "empty", vcgencmd=None),
    )
    rep.report()
    rep.pump()
    (doc,) = _sent(fake)
    for key in ("temperatures_c", "throttled", "throttle_detail", "cpu_freq_mhz", "active"):
        assert key not in doc
    assert "generation" not in doc  # no text generated: no block
    assert doc["latency"]["thermal"] == {"samples": 1}
    rep.buffer.close()


def test_generation_window_goes_into_the_message(tmp_path: Path) -> None:
    fake = FakeTransport()
    gen = GenRecorder(seed=0)
    rep = TelemetryReporter(
        _cfg(tmp_path, tmp_path / "empty"),
        fake,
        LatencyRecorder(),
        lambda: None,
        ThermalReader(tmp_path / "empty", vcgencmd=None),
        generation=gen.window,
    )
    gen.finished(33, 0.12, 0.8)
    gen.rejected()
    rep.report()
    rep.report()  # an idle window after it: no block
    rep.pump()
    first, second = _sent(fake)
    g = first["generation"]
    assert (g["requests"], g["tokens"], g["tok_s"], g["rejected"]) == (1, 33, 40.0, 1)
    assert g["ttft_p50_ms"] == g["ttft_p95_ms"] == 120.0 and "generation" not in second
    assert decode(Telemetry, json.dumps(first).encode()).generation is not None
    rep.buffer.close()


def test_outage_buffers_in_order_and_reports_drops(tmp_path: Path) -> None:
    fake = FakeTransport()
    fake.start(lambda *a: None, lambda: None)
    rep = TelemetryReporter(
        _cfg(tmp_path, tmp_path, max_messages=4),
        fake,
        LatencyRecorder(),
        lambda: None,
        ThermalReader(tmp_path, vcgencmd=None),
    )
    rep.report()
    rep.pump()
    fake.disconnect()
    for _ in range(3):  # within the bound: all kept
        rep.report()
        rep.pump()
    assert len(_sent(fake)) == 1 and rep.buffer.pending() == 3
    fake.connect()
    while rep.pump():
        pass
    assert [d["seq"] for d in _sent(fake)] == [1, 2, 3, 4] and rep.buffer.pending() == 0
    fake.disconnect()
    for _ in range(7):  # 7 over a bound of 4: the 3 oldest go
        rep.report()
        rep.pump()
    fake.connect()
    while rep.pump():
        pass
    rep.report()  # seq 12, carries the last drop count
    while rep.pump():
        pass
    seqs = [d["seq"] for d in _sent(fake)]
    assert seqs == [1, 2, 3, 4, 8, 9, 10, 11, 12]
    # each drop is reported once, by the next message made after it; the total keeps counting
    assert sum(d["buffer"]["dropped"] for d in _sent(fake)) == 3
    assert _sent(fake)[-1]["buffer"]["dropped_total"] == 3
    rep.buffer.close()


def test_message_lost_by_the_transport_across_a_reconnect_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho 2.0.0 can drop a publish that raced the disconnect: it is never acknowledged. The
    reporter publishes it again from the buffer after RESEND_AFTER_S (at least once, in order)."""
    from agent.telemetry import sender as rmod
    from agent.transport.fake import FakeDelivery

    class Lossy(FakeTransport):
        lose = 2  # the seq whose first publish the transport loses

        def publish_tracked(self, topic: str, payload: bytes) -> FakeDelivery:
            if json.loads(payload)["seq"] == self.lose:
                self.lose = -1
                return FakeDelivery(False)  # sent nowhere, never acknowledged
            return super().publish_tracked(topic, payload)

    monkeypatch.setattr(rmod, "RESEND_AFTER_S", 0.0)
    fake = Lossy()
    fake.start(lambda *a: None, lambda: None)
    rep = TelemetryReporter(
        _cfg(tmp_path, tmp_path),
        fake,
        LatencyRecorder(),
        lambda: None,
        ThermalReader(tmp_path, vcgencmd=None),
    )
    for _ in range(3):
        rep.report()
        rep.pump()
    rep.pump()  # forgets the acknowledged ones
    assert [d["seq"] for d in _sent(fake)] == [
        1,
        3,
    ] and rep.buffer.pending() == 1  # 2 waits for its PUBACK
    fake.disconnect()
    fake.connect()
    for _ in range(5):
        rep.report()
        rep.pump()
    while rep.pump():
        pass
    seqs = [d["seq"] for d in _sent(fake)]
    assert sorted(set(seqs)) == list(range(1, 9)) and rep.buffer.pending() == 0
    rep.buffer.close()
