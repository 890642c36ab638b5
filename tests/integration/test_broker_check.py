"""`edgefleet broker check` against real brokers: mosquitto (everything holds), two mosquittos
that are not bridged (the cluster check fails), and the embedded amqtt the demo falls back to
(no shared subscriptions); plus the collector's warning on a broker whose $share is silent."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.clikit import main
from agent.protocol import topics
from agent.protocol.messages import StateMessage, encode
from fleet.collect import Collector
from fleet.deploy import deploy
from fleet.localfleet import Procs, start_broker
from fleet.mqtt import SyncClient, broker_config
from tests.agent_helpers import Broker, operator

pytestmark = pytest.mark.integration


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main(["broker", "check", *argv, "--timeout", "3", "--json"])
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    rep["stderr"] = cap.err
    return rc, rep


def statuses(rep: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in rep["checks"]}


def scratch_left(url: str) -> dict[str, bytes]:
    with SyncClient(broker_config(url)) as c:
        return c.retained(f"{topics.PREFIX}/_check/#", quiet=0.5, limit=3.0)


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[str]:
    pytest.importorskip(
        "amqtt", reason="workstation-only: the embedded broker needs amqtt (edgefleet[builder])"
    )
    procs = Procs(tmp_path)
    try:
        url, _ = start_broker(procs, tmp_path, "amqtt")
        yield url
    finally:
        procs.stop_all()


def test_mosquitto_holds_everything_and_is_left_clean(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, rep = check(capsys, "--broker", broker.url)
    assert rc == 0, rep
    assert rep["ok"] is True and rep["brokers"] == [broker.url]
    assert rep["prefix"].startswith("edgefleet/v1/_check/")
    assert statuses(rep) == {
        "retained-wildcard": "holds",
        "topic-names": "holds",
        "qos1": "holds",
        "last-will": "holds",
        "chunk": "holds",
        "share": "holds",
        "cluster": "skipped",
    }
    assert all(set(c) == {"name", "what", "status", "detail", "loses"} for c in rep["checks"])
    assert rep["leftover"] == [] and scratch_left(broker.url) == {}
    # the table, with a chunk size of its own
    assert main(["broker", "check", "--broker", broker.url, "--chunk-size", "65536"]) == 0
    out = capsys.readouterr().out
    assert "65536 bytes read back byte-identical" in out
    assert "everything the fleet needs holds" in out


def test_two_mosquittos_that_are_not_bridged_fail_the_cluster_check(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Broker(tmp_path / "node2")
    other.start()
    try:
        rc, rep = check(capsys, "--broker", broker.url, "--broker", other.url)
    finally:
        other.stop()
    assert rc == 12
    s = statuses(rep)
    assert s.pop("cluster") == "fails" and set(s.values()) == {"holds"}
    ck = rep["checks"][-1]
    assert ck["detail"] == (
        f"a retained message published on {broker.url} is not seen on {other.url}"
    )
    assert ck["loses"].startswith("retained messages are per node")
    assert "fails cluster" in rep["stderr"]


def test_amqtt_the_demo_broker_holds_all_but_shared_subscriptions(
    amqtt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, rep = check(capsys, "--broker", amqtt)
    assert rc == 12
    s = statuses(rep)
    assert s.pop("share") == "fails" and s.pop("cluster") == "skipped"
    assert set(s.values()) == {"holds"}, rep
    share = next(c for c in rep["checks"] if c["name"] == "share")
    assert share["loses"] == "collect --share-group would store nothing"
    assert rep["leftover"] == []


def test_an_unreachable_broker_is_exit_8_not_a_verdict() -> None:
    assert main(["broker", "check", "--broker", "mqtt://127.0.0.1:1"]) == 8


def test_deploy_of_an_unpublished_version_on_a_sound_broker_still_says_so(broker: Broker) -> None:
    from agent.errors import UsageError

    with pytest.raises(
        UsageError, match=r"is not published on .* \(run `edgefleet publish` first\)"
    ):
        deploy(broker_config(broker.url), "nothing@9.9.9", operator(), device="d1")


def test_collect_share_group_warns_when_nothing_comes_through_share(
    amqtt: str, tmp_path: Path
) -> None:
    state = StateMessage(
        device="d1", online=True, agent_version="0", profile="p", seq=1, ts=time.time()
    )
    with SyncClient(broker_config(amqtt)) as c:
        c.publish(topics.device_topic("d1", "state"), encode(state), retain=True)
        c.flush()
        col = Collector(broker_config(amqtt), str(tmp_path / "f.db"), "g", share_silence_s=1.0)
        col.start()
        try:
            c.publish(topics.device_topic("d1", "events"), b"{}", retain=False)  # never delivered
            c.flush()
            end = time.monotonic() + 15
            warning = None
            while warning is None and time.monotonic() < end:
                warning = col.share.warning()
                time.sleep(0.1)
        finally:
            col.stop()
            c.publish(topics.device_topic("d1", "state"), b"", retain=True)
            c.flush()
    assert warning is not None
    assert warning.startswith("no message arrived on $share/g/edgefleet/v1/devices/+/events")
    assert "1 device(s) are online" in warning and "edgefleet broker check" in warning
