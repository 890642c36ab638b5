"""What a real agent process keeps out of memory (bench/agent_overhead.py measures the RSS):
cryptography loads only once the agent verifies something, not to start and serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.agent_helpers import Broker, Listener, deploy, free_port, publish

pytestmark = pytest.mark.integration


def _libs(pid: int) -> str:
    """The files this process maps (its libraries), one per line."""
    return "\n".join(
        line.split()[-1]
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if line.split()[-1].endswith(".so") or ".so." in line.split()[-1]
    )


def test_agent_loads_cryptography_only_to_verify(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha = publish(broker.url, artifacts(version="1.0.0"))
    p = agents.start("fp", serve={"enabled": True, "port": free_port()})
    deploy(broker.url, "tiny@1.0.0", device="fp")
    listener.wait_state("fp", "HEALTHY", sha, timeout=30)
    assert p.proc is not None
    maps = _libs(p.proc.pid)
    assert "/cryptography/hazmat/" in maps  # verifying the announcement and the artifact loaded it
    # after a restart the installed model serves without anything being verified
    p.stop()
    seq = listener.wait_message("edgefleet/v1/devices/fp/state", lambda d: not d["online"])["seq"]
    p = agents.start("fp")
    listener.wait_message(
        "edgefleet/v1/devices/fp/state",
        lambda d: d["online"] and d["seq"] > seq and d["active"] is not None,
    )
    assert p.proc is not None
    maps = _libs(p.proc.pid)
    assert "/onnxruntime/capi/" in maps  # it does serve the model
    assert "/cryptography/hazmat/" not in maps
