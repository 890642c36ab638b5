"""End to end: publish + deploy with the builder's fleet code, a real agent process installs it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.agent_helpers import TIME_SCALE, Broker, Listener, active_sha, deploy, publish

pytestmark = pytest.mark.integration


def test_full_deploy_then_upgrade(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    a1 = artifacts(version="1.0.0")
    a2 = artifacts(version="1.1.0", seed=1)
    sha1 = publish(broker.url, a1)
    # The relative p95 gate has its own tests; here a loaded runner's jitter on a 0.05 ms model must
    # not decide the upgrade, so the absolute slack is generous.
    agents.start("dev1", groups=("lab",), p95_slack_ms=50.0 * TIME_SCALE)
    deploy(broker.url, "tiny@1.0.0", group="lab")
    for state in ("FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE", "HEALTHY"):
        ev = listener.wait_state("dev1", state, sha1, timeout=30)
        assert ev["reason"] == ""
    sd = agents.state_dir("dev1")
    assert active_sha(sd) == sha1
    assert (sd / "active").is_symlink()
    # a device deployment wins over the group's
    sha2 = publish(broker.url, a2)
    deploy(broker.url, "tiny@1.1.0", device="dev1")
    active = listener.wait_state("dev1", "ACTIVE", sha2, timeout=30)
    assert active["detail"]["previous"] == "tiny@1.0.0"
    assert "p95_ms" in active["detail"]
    listener.wait_state("dev1", "HEALTHY", sha2, timeout=30)
    assert active_sha(sd) == sha2
    assert (
        len([p for p in (sd / "versions").iterdir() if not p.name.startswith(".")]) == 2
    )  # keep 1 previous


def test_deploy_over_mqtt5(broker: Broker, listener: Listener, agents: Any, artifacts: Any) -> None:
    sha = publish(broker.url, artifacts(version="1.0.0"))
    agents.start("v5", protocol="5")
    deploy(broker.url, "tiny@1.0.0", device="v5")
    listener.wait_state("v5", "HEALTHY", sha, timeout=30)
    assert active_sha(agents.state_dir("v5")) == sha
