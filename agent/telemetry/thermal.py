"""Thermal state from sysfs (thermal zones, cpufreq, throttle counters) and `vcgencmd`.

Everything is read under a configurable root, so tests use fixture trees. A sensor the device
lacks, or a file that cannot be read (EIO, EACCES, garbage), is left out, never an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `vcgencmd get_throttled` bits (Raspberry Pi firmware): current state in the low bits, "has
# happened since boot" in bits 16-19.
VCGEN_BITS = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}
VCGEN_NOW_THROTTLING = (1 << 1) | (1 << 2) | (1 << 3)
_THROTTLED_RE = re.compile(r"throttled=(0x[0-9a-fA-F]+|[0-9]+)")
# Trip point types at which the kernel starts cooling the CPU down (or shuts it off).
COOLING_TRIPS = ("passive", "hot", "critical")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_vcgencmd(text: str) -> dict[str, Any] | None:
    """``throttled=0x50005`` -> {"raw": "0x50005", "under_voltage": True, ...}; None if unparsable."""
    m = _THROTTLED_RE.search(text)
    if m is None:
        return None
    value = int(m.group(1), 0)
    out: dict[str, Any] = {"raw": hex(value)}
    for bit, name in VCGEN_BITS.items():
        out[name] = bool(value & (1 << bit))
    out["throttling_now"] = bool(value & VCGEN_NOW_THROTTLING)
    return out


@dataclass
class ThermalState:
    """One reading. Fields are None (or empty) when the device has no such sensor."""

    temperatures_c: dict[str, float] = field(default_factory=dict)
    throttled: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    cpu_freq_mhz: float | None = None

    @property
    def max_temp_c(self) -> float | None:
        return max(self.temperatures_c.values()) if self.temperatures_c else None


class ThermalReader:
    """Reads ROOT/sys/class/thermal and ROOT/sys/devices/system/cpu; keeps the throttle counters
    of the previous reading so ``throttled`` also says whether they went up since then."""

    def __init__(self, root: Path = Path("/"), vcgencmd: str | None = "auto") -> None:
        self.root = root
        self.thermal = root / "sys" / "class" / "thermal"
        self.cpus = root / "sys" / "devices" / "system" / "cpu"
        self.vcgencmd = shutil.which("vcgencmd") if vcgencmd == "auto" else vcgencmd
        self._last_counts: dict[str, int] | None = None

    def zones(self) -> tuple[dict[str, float], list[str]]:
        """Temperature of each zone (by type, else zone name) and the zones at a cooling trip point."""
        temps: dict[str, float] = {}
        hot: list[str] = []
        for z in sorted(self.thermal.glob("thermal_zone*")):
            milli = _read_int(z / "temp")
            if milli is None:
                continue
            name = _read(z / "type") or z.name
            if name in temps:
                name = f"{name}.{z.name}"
            temps[name] = round(milli / 1000.0, 3)
            for trip in z.glob("trip_point_*_temp"):
                kind = _read(trip.with_name(trip.name.replace("_temp", "_type")))
                limit = _read_int(trip)
                if kind in COOLING_TRIPS and limit is not None and limit > 0 and milli >= limit:
                    hot.append(f"{name}:{kind}")
                    break
        return temps, hot

    def cpufreq(self) -> dict[str, float]:
        """Current, allowed-maximum and hardware-maximum frequency (MHz), the highest over CPUs."""
        cur: list[float] = []
        cap: list[float] = []
        hw: list[float] = []
        for d in self.cpus.glob("cpu[0-9]*/cpufreq"):
            for path, out in (
                ("scaling_cur_freq", cur),
                ("scaling_max_freq", cap),
                ("cpuinfo_max_freq", hw),
            ):
                v = _read_int(d / path)
                if v is not None and v > 0:
                    out.append(v / 1000.0)
        res: dict[str, float] = {}
        for key, vals in (("cur_mhz", cur), ("cap_mhz", cap), ("hw_max_mhz", hw)):
            if vals:
                res[key] = max(vals)
        return res

    def throttle_counts(self) -> dict[str, int]:
        """Sum over CPUs of each thermal_throttle/*_throttle_count (x86 core and package)."""
        counts: dict[str, int] = {}
        for f in self.cpus.glob("cpu[0-9]*/thermal_throttle/*_throttle_count"):
            v = _read_int(f)
            if v is not None:
                key = f.name.removesuffix("_throttle_count")
                counts[key] = counts.get(key, 0) + v
        return counts

    def vcgencmd_throttled(self) -> dict[str, Any] | None:
        if not self.vcgencmd:
            return None
        try:
            proc = subprocess.run(
                [self.vcgencmd, "get_throttled"],
                capture_output=True,
                text=True,
                timeout=2.0,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_vcgencmd(proc.stdout) if proc.returncode == 0 else None

    def read(self) -> ThermalState:
        temps, hot = self.zones()
        freq = self.cpufreq()
        counts = self.throttle_counts()
        vc = self.vcgencmd_throttled()
        detail: dict[str, Any] = {}
        signals: list[bool] = []
        if temps:
            signals.append(bool(hot))
            if hot:
                detail["at_trip_point"] = hot
        if "cap_mhz" in freq and "hw_max_mhz" in freq:
            capped = freq["cap_mhz"] < freq["hw_max_mhz"]
            signals.append(capped)
            if capped:
                detail["freq_cap_mhz"] = freq["cap_mhz"]
                detail["freq_hw_max_mhz"] = freq["hw_max_mhz"]
        if counts:
            detail["throttle_counts"] = counts
            if self._last_counts is not None:
                delta = sum(counts.values()) - sum(self._last_counts.values())
                detail["throttle_events"] = max(delta, 0)
                signals.append(delta > 0)
            self._last_counts = counts
        if vc is not None:
            detail["vcgencmd"] = vc
            signals.append(bool(vc["throttling_now"]))
        return ThermalState(temps, any(signals) if signals else None, detail, freq.get("cur_mhz"))


class WindowThermal:
    """The thermal state over one telemetry window: hottest reading, throttled at any sample."""

    def __init__(self) -> None:
        self.max_temp_c: float | None = None
        self.throttled: bool | None = None
        self.samples = 0

    def add(self, s: ThermalState) -> None:
        self.samples += 1
        t = s.max_temp_c
        if t is not None and (self.max_temp_c is None or t > self.max_temp_c):
            self.max_temp_c = t
        if s.throttled is not None:
            self.throttled = bool(self.throttled) or s.throttled

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples}
        if self.max_temp_c is not None:
            out["max_temp_c"] = self.max_temp_c
        if self.throttled is not None:
            out["throttled"] = self.throttled
        return out
