"""Birth / Last Will, publish idempotence and deploy errors against a real broker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.errors import BrokerError, UsageError
from agent.protocol import topics
from fleet.deploy import deploy as fleet_deploy
from fleet.mqtt import broker_config
from fleet.publish import publish_artifact
from tests.agent_helpers import Broker, Listener, deploy, free_port, operator

pytestmark = pytest.mark.integration


def test_birth_and_last_will(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    proc = agents.start("lw")
    state_t = topics.device_topic("lw", "state")
    birth = listener.wait_message(state_t, lambda m: m["online"] is True, timeout=20)
    assert birth["profile"] == "test-cpu" and birth["active"] is None and birth["agent_version"]
    sha = publish_artifact(
        artifacts(version="1.0.0"), broker_config(broker.url), chunk_size=1024
    ).sha256
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
        fleet_deploy(cfg, "tiny@9.9.9", operator(), device="x")
    with pytest.raises(UsageError, match="NAME@VERSION"):
        fleet_deploy(cfg, "tiny-1.0", operator(), device="x")
    with pytest.raises(UsageError, match="exactly one"):
        fleet_deploy(cfg, "tiny@1.0.0", operator())
    res = fleet_deploy(cfg, "tiny@1.0.0", operator(), group="lab")
    assert res.deployment.sha256 == first.sha256 and res.topic == topics.group_deployment("lab")
    with pytest.raises(BrokerError, match="cannot connect"):
        publish_artifact(art, broker_config(f"mqtt://127.0.0.1:{free_port()}"))


def test_publish_verifies_before_it_repoints_an_index_entry(
    broker: Broker, artifacts: Any, keys: Any, other_keys: Any
) -> None:
    from agent.errors import IntegrityError
    from agent.protocol.signing import load_public_key

    cfg = broker_config(broker.url)
    first = publish_artifact(artifacts(version="2.0.0"), cfg, chunk_size=4096)
    other = artifacts(
        version="2.0.0", seed=7
    )  # another model under the same name, version, profile
    with pytest.raises(UsageError, match="already published as another artifact"):
        publish_artifact(other, cfg, chunk_size=4096)
    with pytest.raises(IntegrityError):  # signed by a key the operator does not trust
        publish_artifact(other, cfg, chunk_size=4096, trusted=[load_public_key(other_keys.public)])
    res = publish_artifact(other, cfg, chunk_size=4096, trusted=[load_public_key(keys.public)])
    assert (
        res.sha256 != first.sha256
        and fleet_deploy(cfg, "tiny@2.0.0", operator(), device="x").deployment.sha256 == res.sha256
    )


def test_deploy_to_a_group_no_device_follows_warns(broker: Broker, artifacts: Any) -> None:
    cfg = broker_config(broker.url)
    publish_artifact(artifacts(version="1.0.0"), cfg, chunk_size=4096)
    res = fleet_deploy(cfg, "tiny@1.0.0", operator(), group="nobody-here")
    assert (
        len(res.warnings) == 1
        and "no device" in res.warnings[0]
        and "'nobody-here'" in res.warnings[0]
    )


def test_fleet_status_says_which_online_devices_sent_no_telemetry(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.clikit import main
    from fleet.mqtt import SyncClient
    from tests.fleet_helpers import dumps, state

    with SyncClient(broker_config(broker.url)) as c:
        c.publish(topics.device_topic("quiet", "state"), dumps(state("quiet", 1)), retain=True)
        c.flush()
    capsys.readouterr()
    assert main(["fleet", "status", "--broker", broker.url, "--listen", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "no telemetry within" in err and "quiet" in err
    assert [r["device"] for r in json.loads(out)] == ["quiet"]
