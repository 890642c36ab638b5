"""What this device is: its architecture, Python and runtime versions, and whether they fit the profile.

Reported in the birth message and by `edgefleet-agent status` / `check-config`, so a fleet view
shows which runtime each device really runs (a Jetson's onnxruntime-gpu, a Pi's LiteRT).
"""

from __future__ import annotations

import importlib.metadata
import platform
from dataclasses import dataclass

# The name platform.machine() gives -> the name device profiles use (hardware.arch).
_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "armv8l": "aarch64",
    "armv7": "armv7l",
    "armhf": "armv7l",
}

# runtime name -> distributions that provide its import package, first installed one is reported
# (onnxruntime-gpu is what NVIDIA ships for Jetson; it installs the same `onnxruntime` module).
_RUNTIME_DISTS = {
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
    ),
    "litert": ("ai-edge-litert", "ai-edge-litert-nightly", "tflite-runtime"),
}


def machine() -> str:
    """This machine's architecture in the profiles' vocabulary (x86_64, aarch64, armv7l)."""
    m = platform.machine()
    return _ARCH_ALIASES.get(m.lower(), m)


def runtime_versions() -> dict[str, str]:
    """Installed runtime -> 'distribution version' (e.g. 'onnxruntime-gpu 1.19.0'), from package metadata.

    Metadata only: nothing is imported, so this is cheap and safe to call at start and in `status`.
    """
    found: dict[str, str] = {}
    for runtime, dists in _RUNTIME_DISTS.items():
        for dist in dists:
            try:
                found[runtime] = f"{dist} {importlib.metadata.version(dist)}"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


@dataclass(frozen=True)
class DeviceFacts:
    machine: str
    python: str
    system: str
    runtimes: dict[str, str]

    def to_dict(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "python": self.python,
            "system": self.system,
            "runtimes": dict(self.runtimes),
        }

    def line(self) -> str:
        rts = ", ".join(self.runtimes.values()) or "no runtime"
        return f"{self.machine}, Python {self.python}, {self.system}, {rts}"


def facts() -> DeviceFacts:
    return DeviceFacts(
        machine(),
        platform.python_version(),
        f"{platform.system()} {platform.release()}",
        runtime_versions(),
    )


def arch_problem(profile_name: str, profile_arch: str, here: str | None = None) -> str | None:
    """Why this machine does not match the profile's hardware.arch, or None when it does."""
    here = here or machine()
    if here == profile_arch:
        return None
    return (
        f"profile '{profile_name}' is for {profile_arch} (hardware.arch) but this machine is {here}: "
        "its artifacts were built and budgeted for other hardware"
    )
