"""Helpers for fleet tests: a real PostgreSQL server in a temp dir, schema-conforming telemetry
messages, and a bounded wait."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.agent_helpers import free_port


def pg_bin_dir() -> Path | None:
    """Directory of initdb/pg_ctl (Debian: /usr/lib/postgresql/N/bin), or None if not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


class Postgres:
    """A throwaway PostgreSQL server on a free loopback port (trust auth, fsync off).

    As root it runs as the ``postgres`` user (initdb refuses root) in a directory that user owns.
    """

    def __init__(self, bindir: Path) -> None:
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        cmd = (["runuser", "-u", "postgres", "--"] if self.as_root else []) + list(args)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed: {res.stderr[-800:] or res.stdout[-800:]}"
            )

    def start(self) -> Postgres:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)


def telemetry(
    device: str,
    seq: int,
    ts: float | None = None,
    p50: float = 1.0,
    p95: float = 2.0,
    temp: float | None = 50.0,
    rss: float | None = 80.0,
    throttled: bool | None = False,
    model: tuple[str, str] | None = ("tiny", "1.0.0"),
    monitor: dict[str, Any] | None = None,
    sha: str = "ab" * 32,
) -> dict[str, Any]:
    """A Telemetry message as the agent sends it; sensors passed as None are left out."""
    doc: dict[str, Any] = {
        "device": device,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "interval_s": 1.0,
        "uptime_s": 10.0 + seq,
        "latency": {
            "count": 10,
            "errors": 0,
            "throughput_per_s": 10.0,
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p95 * 1.2,
            "max_ms": p95 * 1.5,
        },
        "cpu_percent": 12.5,
        "mem_available_mb": 900.0,
        "buffer": {"pending": 0, "dropped": 0},
    }
    if model:
        doc["active"] = {"name": model[0], "version": model[1], "sha256": sha}
    if monitor is not None:
        doc["monitor"] = monitor
    if rss is not None:
        doc["rss_mb"] = rss
    if temp is not None:
        doc["temperatures_c"] = {"cpu-thermal": temp, "gpu-thermal": temp - 3}
    if throttled is not None:
        doc["throttled"] = throttled
    return doc


def state(
    device: str,
    seq: int,
    online: bool = True,
    profile: str = "test-cpu",
    model: tuple[str, str] | None = ("tiny", "1.0.0"),
    ts: float | None = None,
) -> dict[str, Any]:
    return {
        "device": device,
        "online": online,
        "agent_version": "0.1.0",
        "profile": profile,
        "groups": ["lab"],
        "active": {"name": model[0], "version": model[1], "sha256": "ab" * 32} if model else None,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
    }


def event(
    device: str,
    seq: int,
    state_: str,
    version: str = "1.0.0",
    reason: str = "",
    ts: float | None = None,
    sha: str = "ab" * 32,
) -> dict[str, Any]:
    return {
        "device": device,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "kind": "deployment",
        "state": state_,
        "name": "tiny",
        "version": version,
        "sha256": sha,
        "reason": reason,
        "detail": {},
    }


def monitor(
    drift: float = 0.03,
    classes: dict[str, int] | None = None,
    confidence: float = 0.91,
    drifting: bool = False,
) -> dict[str, Any]:
    """A telemetry window's ``monitor`` block as the agent sends it (input x carries ``drift``)."""
    counts = {"0": 12, "1": 30} if classes is None else classes
    return {
        "count": sum(counts.values()),
        "metric": "psi",
        "drift": {"inputs": {"x": drift}, "outputs": {"y": 0.01}, "classes": 0.002, "max": drift},
        "classes": counts,
        "mean_confidence": confidence,
        "low_confidence_rate": 0.02,
        "non_finite": 0,
        "drifting": drifting,
    }


def drift_event(
    device: str, seq: int, ended: bool = False, ts: float | None = None, score: float = 0.41
) -> dict[str, Any]:
    """The agent's drift event: an episode's start, or (``ended``) its end."""
    reason = (
        f"drift ended: input x PSI {score} <= 0.25"
        if ended
        else f"drift: input x PSI {score} > 0.25 (3 windows)"
    )
    return {
        "device": device,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "kind": "drift",
        "name": "tiny",
        "version": "1.0.0",
        "reason": reason,
        "detail": {"scores": {"inputs": {"x": score}}, "threshold": 0.25, "windows": 3},
    }


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def wait_for(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    from tests.agent_helpers import TIME_SCALE

    timeout *= TIME_SCALE  # a give-up point that scales with the machine
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def tensor(arr: Any) -> dict[str, Any]:
    """A captured tensor as a Sample carries it: dtype, shape, base64 of little-endian bytes."""
    import base64

    import numpy as np

    a = np.ascontiguousarray(arr)
    data = base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode()
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": data}


def sample(
    device: str,
    seq: int,
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    label: Any = None,
    trigger: str = "sample",
    model: tuple[str, str] = ("tiny", "1.0.0"),
    ts: float | None = None,
) -> dict[str, Any]:
    """A Sample message (devices/{id}/samples) with numpy arrays as its tensors."""
    doc: dict[str, Any] = {
        "device": device,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "model": {"name": model[0], "version": model[1], "sha256": "ab" * 32},
        "trigger": trigger,
        "redacted": inputs is None,
    }
    if inputs is not None:
        doc["inputs"] = {k: tensor(v) for k, v in inputs.items()}
    doc["outputs"] = {k: tensor(v) for k, v in (outputs or {}).items()}
    if label is not None:
        doc["label"] = label
    return doc
