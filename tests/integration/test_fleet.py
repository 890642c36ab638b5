"""Birth / Last Will, publish idempotence and deploy errors against a real broker."""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import BrokerError, UsageError
from agent.protocol import topics
from fleet.deploy import deploy as fleet_deploy
from fleet.mqtt import broker_config
from fleet.publish import publish_artifact
from tests.agent_helpers import Broker, Listener, deploy, free_port

pytestmark = pytest.mark.integration


def test_birth_and_last_will(broker: Broker, listener: Listener, agents: Any, artifacts: Any) -> None:
    proc = agents.start("lw")
    state_t = topics.device_topic("lw", "state")
    birth = listener.wait_message(state_t, lambda m: m["online"] is True, timeout=20)
    assert birth["profile"] == "test-cpu" and birth["active"] is None and birth["agent_version"]
    sha = publish_artifact(artifacts(version="1.0.0"), broker_config(broker.url), chunk_size=1024).sha256
    deploy(broker.url, "tiny@1.0.0", device="lw")
    listener.wait_message(state_t, lambda m: (m["active"] or {}).get("sha256") == sha, timeout=30)
    proc.kill()
    will = listener.wait_message(state_t, lambda m: m["online"] is False, timeout=20)
    assert will["device"] == "lw"


def test_publish_is_idempotent_and_deploy_errors(broker: Broker, artifacts: Any) -> None:
    cfg = broker_config(broker.url)
    art = artifacts(version="1.0.0")
    first = publish_artifact(art, cfg, chunk_size=4096)
    again = publish_artifact(art, cfg, chunk_size=4096)
    assert not first.skipped and again.skipped and again.sha256 == first.sha256
    with pytest.raises(UsageError, match="not published"):
        fleet_deploy(cfg, "tiny@9.9.9", device="x")
    with pytest.raises(UsageError, match="NAME@VERSION"):
        fleet_deploy(cfg, "tiny-1.0", device="x")
    with pytest.raises(UsageError, match="exactly one"):
        fleet_deploy(cfg, "tiny@1.0.0")
    res = fleet_deploy(cfg, "tiny@1.0.0", group="lab")
    assert res.deployment.sha256 == first.sha256 and res.topic == topics.group_deployment("lab")
    with pytest.raises(BrokerError, match="cannot connect"):
        publish_artifact(art, broker_config(f"mqtt://127.0.0.1:{free_port()}"))
