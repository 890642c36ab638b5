"""Power and energy from fixture sysfs trees (RAPL counters and their wrap, INA3221 rails, hwmon
power sensors, unreadable or missing sensors), windows, and the reporter's energy fields."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.messages import Telemetry, decode
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.power import NO_POWER, PowerReader, PowerReading, WindowPower
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.thermal import ThermalReader
from agent.transport.fake import FakeTransport
from tests.unit.agent.test_telemetry import _cfg, _sent

RAPL_MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj
POWER_KEYS = ("power_w", "energy_mj_per_inference", "power_source")


def _write(root: Path, files: dict[str, Any]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{text}\n")
    return root


def rapl_tree(root: Path, pkg0_uj: int, pkg1_uj: int = 5_000_000) -> Path:
    """Two packages with core/dram subzones (not counted again) and an MMIO twin (ignored)."""
    pc = "sys/class/powercap"
    return _write(
        root,
        {
            f"{pc}/intel-rapl:0/name": "package-0",
            f"{pc}/intel-rapl:0/energy_uj": pkg0_uj,
            f"{pc}/intel-rapl:0/max_energy_range_uj": RAPL_MAX_UJ,
            f"{pc}/intel-rapl:0:0/name": "core",
            f"{pc}/intel-rapl:0:0/energy_uj": 7_000_000,
            f"{pc}/intel-rapl:0:1/name": "dram",
            f"{pc}/intel-rapl:0:1/energy_uj": 3_000_000,
            f"{pc}/intel-rapl:1/name": "package-1",
            f"{pc}/intel-rapl:1/energy_uj": pkg1_uj,
            f"{pc}/intel-rapl:1/max_energy_range_uj": RAPL_MAX_UJ,
            f"{pc}/intel-rapl-mmio:0/name": "package-0",
            f"{pc}/intel-rapl-mmio:0/energy_uj": 9_000_000,
        },
    )


def _set(root: Path, zone: str, uj: int) -> None:
    (root / f"sys/class/powercap/{zone}/energy_uj").write_text(f"{uj}\n")


def ina3221_tree(root: Path, with_total: bool = True) -> Path:
    """Jetson Orin-style rails on hwmon1, and another chip's power sensor (not used beside it)."""
    rails = {1: ("VDD_IN", 5080, 1200), 2: ("VDD_CPU_GPU_CV", 5070, 400), 3: ("VDD_SOC", 5060, 300)}
    files: dict[str, Any] = {
        "sys/class/hwmon/hwmon0/name": "acme",
        "sys/class/hwmon/hwmon0/power1_input": 9_000_000,
        "sys/class/hwmon/hwmon1/name": "ina3221",
        "sys/class/hwmon/hwmon1/in4_input": 12,  # a shunt voltage: no current beside it
    }
    for n, (label, mv, ma) in rails.items():
        if n == 1 and not with_total:
            continue
        files[f"sys/class/hwmon/hwmon1/in{n}_label"] = label
        files[f"sys/class/hwmon/hwmon1/in{n}_input"] = mv
        files[f"sys/class/hwmon/hwmon1/curr{n}_input"] = ma
    return _write(root, files)


def _deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` unreadable, as energy_uj is to a non-root agent since Linux 5.10."""
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: fail the read as the kernel does for a user
        real = Path.read_text

        def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", read_text)


def test_rapl_counts_each_package_once_and_undoes_the_wrap(tmp_path: Path) -> None:
    root = rapl_tree(tmp_path, pkg0_uj=RAPL_MAX_UJ - 500_000)
    r = PowerReader(root)
    assert r.read() == PowerReading(0.0, None, "rapl")  # the starting point
    _set(root, "intel-rapl:0:0", 99_000_000)  # a subzone: part of package 0, not added
    _set(root, "intel-rapl-mmio:0", 99_000_000)
    _set(root, "intel-rapl:0", 1_500_000)  # wrapped: 0.5 J to the top, then 1.5 J
    _set(root, "intel-rapl:1", 6_000_000)
    assert r.read() == PowerReading(pytest.approx(3.0), None, "rapl")
    _set(root, "intel-rapl:0", 2_500_000)
    assert r.read().joules == pytest.approx(4.0)


def test_rapl_unreadable_counter_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = rapl_tree(tmp_path, pkg0_uj=1_000_000)
    for zone in ("intel-rapl:0", "intel-rapl:1"):
        _deny(root / f"sys/class/powercap/{zone}/energy_uj", monkeypatch)
    assert PowerReader(root).read() == NO_POWER
    # a power sensor elsewhere is used instead
    _write(root, {"sys/class/hwmon/hwmon0/name": "acme", "sys/class/hwmon/hwmon0/power1_input": 2})
    assert PowerReader(root).read() == PowerReading(None, 2e-6, "hwmon:acme")


def test_rapl_package_unreadable_for_a_while_adds_its_energy_later(tmp_path: Path) -> None:
    root = rapl_tree(tmp_path, pkg0_uj=1_000_000)
    r = PowerReader(root)
    r.read()
    (root / "sys/class/powercap/intel-rapl:1/energy_uj").write_text("garbage\n")
    _set(root, "intel-rapl:0", 2_000_000)
    assert r.read().joules == pytest.approx(1.0)
    _set(root, "intel-rapl:1", 8_000_000)  # 3 J since its last readable value
    assert r.read().joules == pytest.approx(4.0)


def test_ina3221_prefers_the_input_rail_else_sums(tmp_path: Path) -> None:
    got = PowerReader(ina3221_tree(tmp_path / "orin")).read()
    assert got.source == "ina3221:VDD_IN" and got.joules is None
    assert got.watts == pytest.approx(5.080 * 1.2)
    got = PowerReader(ina3221_tree(tmp_path / "rails", with_total=False)).read()
    assert got.source == "ina3221"
    assert got.watts == pytest.approx(5.070 * 0.4 + 5.060 * 0.3)


def test_hwmon_power_sums_every_chip_sensor(tmp_path: Path) -> None:
    hw = "sys/class/hwmon"
    root = _write(
        tmp_path,
        {
            f"{hw}/hwmon0/name": "coretemp",
            f"{hw}/hwmon0/temp1_input": 45000,
            f"{hw}/hwmon1/name": "amdgpu",
            f"{hw}/hwmon1/power1_input": 15_000_000,
            f"{hw}/hwmon1/power1_label": "PPT",
            f"{hw}/hwmon2/name": "board",
            f"{hw}/hwmon2/power1_input": 2_500_000,
            f"{hw}/hwmon2/power2_input": 500_000,
        },
    )
    assert PowerReader(root).read() == PowerReading(None, 18.0, "hwmon:amdgpu+board")


def test_no_sensor_is_not_an_error(tmp_path: Path) -> None:
    assert PowerReader(tmp_path).read() == NO_POWER
    (tmp_path / "sys/class/powercap").mkdir(parents=True)  # present, nothing in it
    (tmp_path / "sys/class/hwmon/hwmon0").mkdir(parents=True)
    assert PowerReader(tmp_path).read() == NO_POWER


def test_window_counter_and_samples() -> None:
    w = WindowPower()
    w.add(PowerReading(10.0, None, "rapl"), t=100.0)
    w.add(PowerReading(14.0, None, "rapl"), t=101.0)
    w.add(PowerReading(20.0, None, "rapl"), t=102.0)
    e = w.result(seconds=2.0)
    assert e is not None and (e.power_w, e.energy_j, e.source) == (5.0, 10.0, "rapl")
    assert e.fields(4) == {
        "power_w": 5.0,
        "power_source": "rapl",
        "energy_mj_per_inference": 2500.0,
    }
    assert "energy_mj_per_inference" not in e.fields(0)
    nxt = w.next()  # starts where this one ended
    assert nxt.result(1.0) is None
    nxt.add(PowerReading(23.0, None, "rapl"), t=103.0)
    assert nxt.result(1.0) == type(e)(3.0, 3.0, "rapl")

    s = WindowPower()
    assert s.result(2.0) is None
    s.add(PowerReading(None, 4.0, "ina3221:VDD_IN"))
    s.add(NO_POWER)
    s.add(PowerReading(None, 6.0, "ina3221:VDD_IN"))
    assert s.result(2.0) == type(e)(5.0, 10.0, "ina3221:VDD_IN")
    assert s.next().result(2.0) is None  # samples do not carry over


def _reporter(tmp_path: Path, root: Path, rec: LatencyRecorder) -> tuple[Any, FakeTransport]:
    fake = FakeTransport()
    rep = TelemetryReporter(
        _cfg(tmp_path, root), fake, rec, lambda: None, ThermalReader(root, vcgencmd=None)
    )
    return rep, fake


def test_reporter_rapl_energy_per_inference_across_a_wrap(tmp_path: Path) -> None:
    root = rapl_tree(tmp_path / "sysfs", pkg0_uj=RAPL_MAX_UJ - 1_000_000)
    rec = LatencyRecorder(seed=1)
    rep, fake = _reporter(tmp_path, root, rec)  # its first reading is the starting point
    for _ in range(4):
        rec.record(2.0)
    _set(root, "intel-rapl:0", 500_000)  # wrapped: 1.5 J
    _set(root, "intel-rapl:1", 5_500_000)  # 0.5 J
    rep.sample()
    rep.report()
    _set(root, "intel-rapl:0", 1_500_000)  # 1 J in a window without inferences
    rep.report()
    rep.pump()
    first, second = _sent(fake)
    decode(Telemetry, json.dumps(first).encode())  # the sparse JSON still validates
    assert first["power_source"] == "rapl" and first["power_w"] > 0
    assert first["energy_mj_per_inference"] == pytest.approx(500.0)  # 2 J / 4
    assert second["power_source"] == "rapl" and second["power_w"] > 0
    assert "energy_mj_per_inference" not in second
    rep.buffer.close()


def test_reporter_averages_rail_samples(tmp_path: Path) -> None:
    root = ina3221_tree(tmp_path / "sysfs")
    rail = root / "sys/class/hwmon/hwmon1/curr1_input"
    rail.write_text("1000\n")  # 5.08 W at the reporter's first reading
    rec = LatencyRecorder(seed=1)
    rep, fake = _reporter(tmp_path, root, rec)
    rec.record(1.0)
    rec.record(1.0)
    rail.write_text("2000\n")  # 10.16 W at the sample and at the report
    rep.sample()
    rep.report()
    rep.pump()
    (doc,) = _sent(fake)
    watts = (5.08 + 10.16 + 10.16) / 3
    assert doc["power_source"] == "ina3221:VDD_IN" and doc["power_w"] == pytest.approx(
        watts, abs=1e-3
    )
    # mean power x the window's length / 2 inferences (interval_s is rounded to the millisecond)
    per_inference = watts * doc["interval_s"] * 1000 / 2
    assert doc["energy_mj_per_inference"] == pytest.approx(per_inference, abs=watts * 0.3)
    rep.buffer.close()


def test_reporter_without_sensor_leaves_the_fields_out(tmp_path: Path) -> None:
    rec = LatencyRecorder()
    rep, fake = _reporter(tmp_path, tmp_path / "empty", rec)
    rec.record(1.0)
    rep.sample()
    rep.report()
    rep.pump()
    (doc,) = _sent(fake)
    assert not set(POWER_KEYS) & set(doc)
    rep.buffer.close()
