"""Power and energy from sysfs: RAPL energy counters, Jetson INA3221 rails, hwmon power sensors.

Read under the same root as the thermal state (``telemetry.sysfs_root``), so tests use fixture
trees. One source is used, the first the device has, so nothing is counted twice: RAPL (a
counter, exact over any window), else the INA3221 rails, else hwmon ``power*_input`` (both
instantaneous, averaged over the samples taken in a window). A device without any, or whose
files cannot be read (RAPL's ``energy_uj`` is root-only since Linux 5.10), has no power
figures: they are absent, never an error.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.telemetry.thermal import _read, _read_int

# Top-level RAPL zones (intel-rapl:N); their subzones (intel-rapl:N:M: core, uncore, dram) are
# parts of a package and are not added again.
RAPL_ZONE = re.compile(r"^intel-rapl:\d+$")
# INA3221 rails that measure the board's whole input: preferred to the sum of the rails (which
# would count the input and the rails it feeds). VDD_IN on Orin/Xavier, POM_5V_IN on Nano/TX2.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


class PowerReading(NamedTuple):
    """One reading; every field None when the device has no readable power sensor."""

    joules: float | None  # cumulative energy since the reader's first reading (a counter source)
    watts: float | None  # instantaneous power (a rail or hwmon source)
    source: str | None  # "rapl", "ina3221:VDD_IN", "ina3221" (rails summed), "hwmon:NAME[+NAME]"


NO_POWER = PowerReading(None, None, None)


class PowerReader:
    """Reads ROOT/sys/class/powercap and ROOT/sys/class/hwmon. Keeps each RAPL package's last
    counter value, so ``joules`` grows monotonically across the counters' wrap-arounds."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.powercap = root / "sys" / "class" / "powercap"
        self.hwmon = root / "sys" / "class" / "hwmon"
        self._last_uj: dict[str, int] = {}
        self._joules = 0.0

    def rapl(self) -> float | None:
        """Joules used by all RAPL packages since the first reading; None when none is readable.

        Counts the zones named ``package-N`` (else every top-level zone: ``psys`` alone). A
        package unreadable at one reading adds its energy at the next readable one."""
        zones = [z for z in sorted(self.powercap.glob("intel-rapl:*")) if RAPL_ZONE.match(z.name)]
        packages = [z for z in zones if (_read(z / "name") or "").startswith("package")] or zones
        seen = False
        for z in packages:
            uj = _read_int(z / "energy_uj")
            if uj is None or uj < 0:
                continue
            seen = True
            last = self._last_uj.get(z.name)
            self._last_uj[z.name] = uj
            if last is None:
                continue
            delta = uj - last
            if delta < 0:  # the counter wrapped at max_energy_range_uj (back to 0)
                top = _read_int(z / "max_energy_range_uj")
                if top is None or top < last:
                    continue  # no range to undo the wrap with: leave this interval out
                delta += top
            self._joules += delta / 1e6
        return self._joules if seen else None

    def ina3221(self) -> tuple[float, str] | None:
        """Watts from the INA3221 rails (V x I per rail): the total-input rail when there is one,
        else the sum of the rails; None without a readable rail."""
        rails: dict[str, float] = {}
        for chip in sorted(self.hwmon.glob("hwmon*")):
            if _read(chip / "name") != "ina3221":
                continue
            for vin in sorted(chip.glob("in*_input")):
                n = vin.name[2 : -len("_input")]
                mv, ma = _read_int(vin), _read_int(chip / f"curr{n}_input")
                if mv is None or ma is None:  # a shunt-voltage channel, or a disabled rail
                    continue
                label = _read(chip / f"in{n}_label") or f"in{n}"
                if label in rails:
                    label = f"{label}.{chip.name}"
                rails[label] = mv * ma / 1e6  # mV x mA = µW
        if not rails:
            return None
        for total in TOTAL_RAILS:
            if total in rails:
                return rails[total], f"ina3221:{total}"
        return sum(rails.values()), "ina3221"

    def hwmon_power(self) -> tuple[float, str] | None:
        """Watts: the sum of every other hwmon chip's ``power*_input`` (µW); None when none."""
        watts, names = 0.0, []
        for chip in sorted(self.hwmon.glob("hwmon*")):
            name = _read(chip / "name") or chip.name
            if name == "ina3221":
                continue
            vals = [v for f in sorted(chip.glob("power*_input")) if (v := _read_int(f)) is not None]
            if vals:
                watts += sum(vals) / 1e6
                names.append(name)
        return (watts, "hwmon:" + "+".join(names)) if names else None

    def read(self) -> PowerReading:
        joules = self.rapl()
        if joules is not None:
            return PowerReading(joules, None, "rapl")
        for source in (self.ina3221, self.hwmon_power):
            got = source()
            if got is not None:
                return PowerReading(None, got[0], got[1])
        return NO_POWER


@dataclass(frozen=True)
class WindowEnergy:
    power_w: float  # average over the window
    energy_j: float  # used in the window
    source: str

    def fields(self, inferences: int) -> dict[str, Any]:
        """The message fields: ``power_w``, ``power_source`` and, when inferences ran,
        ``energy_mj_per_inference`` (the window's energy / its inferences)."""
        out: dict[str, Any] = {"power_w": round(self.power_w, 3), "power_source": self.source}
        if inferences > 0:
            out["energy_mj_per_inference"] = round(self.energy_j * 1000.0 / inferences, 4)
        return out


def energy_fields(e: WindowEnergy | None, inferences: int) -> dict[str, Any]:
    """``WindowEnergy.fields``; {} without a power figure (the fields are absent)."""
    return {} if e is None else e.fields(inferences)


class WindowPower:
    """Power over one window: a counter's delta / elapsed time, else the mean of the samples.

    ``next()`` starts the following window at this one's last counter reading, so consecutive
    windows cover the time between them without a gap."""

    def __init__(self, start: tuple[float, float] | None = None) -> None:
        self._first = self._last = start  # (monotonic s, cumulative J) of counter readings
        self._sum_w, self._n = 0.0, 0
        self._source: str | None = "rapl" if start is not None else None

    def add(self, r: PowerReading, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        if r.joules is not None:
            if self._first is None:
                self._first = (t, r.joules)
            self._last = (t, r.joules)
        elif r.watts is not None:
            self._sum_w += r.watts
            self._n += 1
        if r.source is not None:
            self._source = r.source

    def result(self, seconds: float) -> WindowEnergy | None:
        """The window's figures; ``seconds`` (its length) turns a mean power into energy."""
        if self._first is not None and self._last is not None and self._last[0] > self._first[0]:
            joules = self._last[1] - self._first[1]
            return WindowEnergy(joules / (self._last[0] - self._first[0]), joules, "rapl")
        if self._n and self._source is not None:
            watts = self._sum_w / self._n
            return WindowEnergy(watts, watts * max(seconds, 0.0), self._source)
        return None

    def next(self) -> WindowPower:
        return WindowPower(self._last)
