"""Staged rollout end to end: real mosquitto, real agent processes, the builder's rollout code."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

import pytest

from agent.errors import BrokerError, UsageError
from agent.protocol import topics
from fleet.mqtt import SyncClient, broker_config
from fleet.rollout.policy import Gate, Rollout
from fleet.rollout.runner import staged_rollout
from tests.agent_helpers import (
    REPO,
    Broker,
    Listener,
    active_sha,
    deploy,
    free_port,
    operator,
    publish,
)

pytestmark = pytest.mark.integration


def _retained(url: str, topic: str) -> bytes | None:
    with SyncClient(broker_config(url)) as c:
        return c.retained(topic, quiet=0.3, limit=2.0).get(topic)


def _desired_sha(url: str, topic: str) -> str | None:
    """The artifact a retained (signed) deployment names."""
    payload = _retained(url, topic)
    return None if not payload else str(json.loads(payload)["signed"]["body"]["sha256"])


def _birth(listener: Listener, device: str, online: bool = True) -> None:
    listener.wait_message(
        topics.device_topic(device, "state"), lambda m: m["online"] is online, timeout=20
    )


def test_canary_rollout_then_offline_device_catches_up(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha1 = publish(broker.url, artifacts(version="1.0.0"))
    sha2 = publish(broker.url, artifacts(version="1.1.0", seed=1))
    # the relative p95 gate is tested on its own; a loaded runner's jitter must not halt this rollout
    late = agents.start("r3", groups=("lab",), p95_slack_ms=50.0)
    _birth(listener, "r3")
    late.stop()  # SIGTERM: the agent publishes online=false; r3 stays a known member of the group
    _birth(listener, "r3", online=False)
    for d in ("r1", "r2"):
        agents.start(d, groups=("lab",), p95_slack_ms=50.0)
        _birth(listener, d)
    seen: list[str] = []
    ro = staged_rollout(
        broker_config(broker.url),
        "tiny@1.0.0",
        "lab",
        "1",
        operator(),
        wait=True,
        timeout=60,
        on_change=lambda r: seen.append(r.phase),
    )
    assert ro.phase == "done", ro.reason
    assert ro.canaries == ["r1"] and ro.summary()["pending"] == ["r3"]
    assert {d: v.state for d, v in ro.devices.items()} == {
        "r1": "HEALTHY",
        "r2": "HEALTHY",
        "r3": "pending",
    }
    # r2 only got the artifact after the canary was healthy: its first FETCHING follows r1's HEALTHY
    r1_healthy = listener.wait_state("r1", "HEALTHY", sha1)
    r2_fetch = listener.wait_state("r2", "FETCHING", sha1)
    assert r2_fetch["ts"] >= r1_healthy["ts"]
    assert "canary" in seen and "promoted" in seen
    # the group holds the deployment; the canary's own pin is gone (so later group deploys reach it)
    assert _desired_sha(broker.url, topics.group_deployment("lab")) == sha1
    assert _retained(broker.url, topics.device_topic("r1", "deployment")) is None
    # the offline device catches up from the retained desired state when it comes back
    agents.start("r3")
    listener.wait_state("r3", "HEALTHY", sha1, timeout=30)
    assert active_sha(agents.state_dir("r3")) == sha1
    # an upgrade: the canary's ACTIVE event carries both p95 figures, which the gate compares
    ro2 = staged_rollout(
        broker_config(broker.url), "tiny@1.1.0", "lab", "34%", operator(), wait=True, timeout=60
    )
    assert ro2.phase == "done", ro2.reason
    c = ro2.devices["r1"]
    assert c.p95_ms is not None and c.current_p95_ms is not None
    for d in ("r1", "r2", "r3"):
        listener.wait_state(d, "HEALTHY", sha2, timeout=30)


@pytest.mark.skipif(
    importlib.util.find_spec("rich") is None,
    reason="workstation-only: `edgefleet deploy --canary` draws its progress with rich (edgefleet[builder])",
)
def test_halted_rollouts_roll_canaries_back(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    cfg = broker_config(broker.url)
    sha1 = publish(broker.url, artifacts(version="1.0.0"))
    bad = publish(broker.url, artifacts(version="1.1.0", bad_golden=True))
    for d in ("h1", "h2"):
        agents.start(d, groups=("lab",))
    deploy(broker.url, "tiny@1.0.0", group="lab")
    for d in ("h1", "h2"):
        listener.wait_state(d, "HEALTHY", sha1, timeout=30)

    # 1. broken golden vectors: the canary's self-test rejects it, the group never sees it
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.clikit",
            "deploy",
            "tiny@1.1.0",
            "--group",
            "lab",
            "--canary",
            "1",
            "--timeout",
            "60",
            "--broker",
            broker.url,
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 11, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["phase"] == "halted" and "self-test failed" in summary["reason"]
    assert summary["devices"]["h1"]["state"] == "ROLLED_BACK"
    assert proc.stderr.strip().splitlines()[-1].startswith("error: rollout halted: h1: ROLLED_BACK")
    assert not any(e.get("sha256") == bad for e in listener.events("h2"))
    assert _desired_sha(broker.url, topics.group_deployment("lab")) == sha1
    assert _retained(broker.url, topics.device_topic("h1", "deployment")) is None
    assert active_sha(agents.state_dir("h1")) == sha1

    # 2. the canary installs fine but fails the rollout's gate (a p95 limit nothing can meet): it is
    # rolled back by command, its device pin cleared, and it stays on 1.0.0 after its probation
    sha2 = publish(broker.url, artifacts(version="1.2.0", seed=2))
    ro = staged_rollout(
        cfg,
        "tiny@1.2.0",
        "lab",
        "1",
        operator(),
        gate=Gate(max_p95_regression_pct=-100.0, p95_slack_ms=0.0),
        timeout=60,
    )
    assert ro.phase == "halted" and "on-device p95" in ro.reason
    assert ro.devices["h1"].rolled_back
    ev = listener.wait_state("h1", "ROLLED_BACK", sha2, timeout=20)
    assert "rollback requested by command" in ev["reason"]
    listener.wait_message(
        topics.device_topic("h1", "state"),
        lambda m: (m["active"] or {}).get("sha256") == sha1,
        timeout=20,
    )
    assert _retained(broker.url, topics.device_topic("h1", "deployment")) is None
    assert not any(e.get("sha256") == sha2 for e in listener.events("h2"))
    assert active_sha(agents.state_dir("h1")) == sha1

    # 3. one-line errors: unknown version, a group with no devices, no broker
    with pytest.raises(UsageError, match="not published"):
        staged_rollout(cfg, "tiny@9.9.9", "lab", "1", operator(), timeout=5)
    with pytest.raises(UsageError, match="has no devices"):
        staged_rollout(cfg, "tiny@1.0.0", "nobody", "1", operator(), timeout=5)
    with pytest.raises(BrokerError, match="cannot connect"):
        staged_rollout(
            broker_config(f"mqtt://127.0.0.1:{free_port()}"),
            "tiny@1.0.0",
            "lab",
            "1",
            operator(),
            timeout=5,
        )
    assert isinstance(ro, Rollout)
