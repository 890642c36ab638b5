"""A real agent on a small real tmpfs as its state dir, filled up by another file: a deployment
that does not fit waits for disk space (with the reason, not rejected), the old model keeps
serving, telemetry that cannot be buffered is counted as dropped, a restart on the full disk comes
up serving and waiting; once the filler is deleted the agent fetches and installs the deployment
by itself."""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import Broker, Listener, active_sha, deploy, publish, stop_process

pytestmark = pytest.mark.integration
DEV = "df"
TMPFS_MB = 16


@pytest.fixture
def tmpfs_state(tmp_path: Path) -> Iterator[Path]:
    """A TMPFS_MB tmpfs mounted where the agents fixture puts DEV's state dir (unmounted last:
    this fixture is set up before ``agents``, so it is torn down after the agent stopped)."""
    d = tmp_path / DEV / "state"
    d.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(d)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {(r.stderr or r.stdout).strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full; its size."""
    n = 0
    with path.open("wb", buffering=0) as fh:
        for block in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    n += fh.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return n


def test_disk_full_waits_keeps_serving_counts_drops_and_recovers(
    tmpfs_state: Path, broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    small = artifacts(version="1.0.0")
    big = artifacts(version="2.0.0", seed=1, extra_params=1_000_000)  # about 4 MB
    sha1 = publish(broker.url, small)
    sha2 = publish(broker.url, big, chunk_size=64 * 1024)
    p = agents.start(
        DEV,
        telemetry={"interval_s": 0.25},
        transfer={"disk_retry_s": 0.5, "disk_retry_max_s": 1.0, "free_space_margin_mb": 1},
    )
    assert agents.state_dir(DEV) == tmpfs_state
    deploy(broker.url, "tiny@1.0.0", device=DEV)
    listener.wait_state(DEV, "HEALTHY", sha1, timeout=60)

    filler = tmpfs_state / "filler.bin"
    assert fill(filler) > 0
    deploy(broker.url, "tiny@2.0.0", device=DEV)
    ev = listener.wait_event(
        DEV, lambda e: "waiting for disk space" in e.get("reason", ""), timeout=30
    )
    assert ev["sha256"] == sha2 and ev["state"] == "FETCHING"
    assert f"free on {tmpfs_state}" in ev["reason"] and "needs " in ev["reason"]
    # rechecked on its timer while still full: a second wait, and nothing refused or left behind
    listener.wait_event(
        DEV,
        lambda e: "waiting for disk space" in e.get("reason", "") and e["seq"] > ev["seq"],
        timeout=30,
    )
    assert not [e for e in listener.events(DEV) if e.get("state") == "REJECTED"]
    assert list((tmpfs_state / "downloads").iterdir()) == []
    assert not [f for f in tmpfs_state.iterdir() if f.name.endswith(".tmp")]
    assert p.alive() and active_sha(tmpfs_state) == sha1  # the old model still serves

    # a restart on the full disk: it starts, serves the old model and goes on waiting
    assert stop_process(p.proc) == 0 if p.proc else False
    restarted = time.time()
    p = agents.start(DEV)

    def waits_since(t: float) -> list[dict[str, Any]]:
        reason = "waiting for disk space"
        return [e for e in listener.events(DEV) if reason in e["reason"] and e["ts"] > t]

    # three checks on its timer (about 1.5 s on the full disk): telemetry cannot be buffered
    listener.wait_event(DEV, lambda _e: len(waits_since(restarted)) >= 3, timeout=60)
    listener.wait_message(
        f"edgefleet/v1/devices/{DEV}/state",
        lambda d: d["online"] and d["ts"] > restarted and d["active"]["sha256"] == sha1,
    )
    assert p.alive() and list((tmpfs_state / "downloads").iterdir()) == []

    filler.unlink()
    listener.wait_state(DEV, "HEALTHY", sha2, timeout=90)
    assert active_sha(tmpfs_state) == sha2
    # telemetry made while the disk was full was counted, and the count reported afterwards
    topic = f"edgefleet/v1/devices/{DEV}/telemetry"
    doc = listener.wait_message(topic, lambda d: d["buffer"]["dropped"] > 0, timeout=30)
    assert doc["buffer"]["dropped_total"] >= doc["buffer"]["dropped"] > 0
    assert p.alive()
