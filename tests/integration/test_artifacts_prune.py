"""`edgefleet artifacts list|prune` on a real mosquitto: deployed artifacts stay and still
install, the rest is really gone, and a device fetching a pruned artifact ends REJECTED with a
clear reason while its old model keeps serving."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from agent.clikit import main as edgefleet
from agent.protocol import topics
from agent.protocol.messages import MAX_ANNOUNCEMENT_BYTES, ArtifactAnnouncement, decode
from fleet.mqtt import SyncClient, broker_config
from tests.agent_helpers import (
    TIME_SCALE,
    Broker,
    Listener,
    active_sha,
    deploy,
    publish,
    publish_partial,
    retained_figures,
    sealed_command,
    send,
)

pytestmark = pytest.mark.integration
CHUNK = 1024


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert edgefleet(["artifacts", *args, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def _sys_count(broker: Broker, other_than: int) -> dict[str, int]:
    """Figures once mosquitto's $SYS count (published every second) moved off ``other_than``."""
    deadline = time.monotonic() + 10 * TIME_SCALE
    while True:
        fig = retained_figures(broker.url)
        if fig["sys_retained_count"] != other_than or time.monotonic() > deadline:
            return fig
        time.sleep(0.5)


def test_prune_keeps_deployed_and_frees_the_rest(
    broker: Broker,
    listener: Listener,
    agents: Any,
    artifacts: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with broker.conf.open("a") as fh:
        fh.write("sys_interval 1\n")
    broker.restart()
    shas = [publish(broker.url, artifacts(version=f"{v}.0.0", seed=v), CHUNK) for v in (1, 2, 3, 4)]
    deploy(broker.url, "tiny@1.0.0", device="p1")
    deploy(broker.url, "tiny@2.0.0", group="lab")
    before = _sys_count(broker, -1)

    listed = _cli(capsys, "list", "--broker", broker.url)
    rows = {r["version"]: r for r in listed["artifacts"]}
    assert sorted(rows) == ["1.0.0", "2.0.0", "3.0.0", "4.0.0"]
    assert [d["target"] for d in rows["1.0.0"]["deployed_to"]] == ["device p1"]
    assert [d["target"] for d in rows["2.0.0"]["deployed_to"]] == ["group lab"]
    assert not rows["2.0.0"]["deployed_to"][0]["expired"]
    assert rows["3.0.0"]["complete"] and rows["3.0.0"]["deployed_to"] == []

    dry = _cli(capsys, "prune", "--broker", broker.url, "--keep", "1", "--dry-run")
    assert [a["sha256"] for a in dry["remove"]] == [shas[2]]  # 4 is newest, 1 and 2 deployed
    assert dry["cleared"] == 0 and dry["bytes_freed"] > 0
    assert retained_figures(broker.url)["retained_bytes"] == before["retained_bytes"]

    done = _cli(capsys, "prune", "--broker", broker.url, "--keep", "1")
    assert [a["sha256"] for a in done["remove"]] == [shas[2]]
    assert done["cleared"] == done["topics"] == rows["3.0.0"]["topics"]
    after = _sys_count(broker, before["sys_retained_count"])
    freed = before["retained_bytes"] - after["retained_bytes"]
    print(
        "retained before prune:", json.dumps(before), "after:", json.dumps(after),
        f"freed {freed} bytes (planned {done['bytes_freed']})",
    )  # fmt: skip
    assert freed == done["bytes_freed"]
    assert before["retained_messages"] - after["retained_messages"] == done["topics"]
    # mosquitto's $SYS count is printed, not checked: it counts $SYS topics too, which still
    # appear in a new broker's first seconds (bench/artifacts_prune.py waits for it to settle)
    # really gone: a fresh subscriber gets nothing of it
    with SyncClient(broker_config(broker.url)) as c:
        assert c.retained(f"{topics.PREFIX}/artifacts/{shas[2]}/#", quiet=0.5) == {}
        assert c.retained(topics.artifact_index_versions("tiny", "3.0.0"), quiet=0.5) == {}
        assert len(c.retained(topics.artifact_chunks_all(shas[3]), quiet=0.5)) > 0
    again = _cli(capsys, "prune", "--broker", broker.url, "--keep", "1", "--dry-run")
    assert again["remove"] == []

    # the deployed ones still install, on a device and through a group
    agents.start("p1")
    agents.start("p2", groups=("lab",))
    listener.wait_state("p1", "HEALTHY", shas[0], timeout=60)
    listener.wait_state("p2", "HEALTHY", shas[1], timeout=60)


def test_device_mid_fetch_of_a_pruned_artifact_ends_rejected(
    broker: Broker,
    listener: Listener,
    agents: Any,
    artifacts: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = publish(broker.url, artifacts(version="1.0.0"), CHUNK)
    p = agents.start("m1", transfer={"stall_s": 0.5, "stall_tries": 3})
    deploy(broker.url, "tiny@1.0.0", device="m1")
    listener.wait_state("m1", "HEALTHY", old, timeout=60)

    # 2.0.0 is deployed by a command (the broker retains no deployment naming it), and only
    # its first chunks are there when the device starts: it is mid-fetch when prune runs
    art = artifacts(version="2.0.0", seed=2)
    n = math.ceil(art.stat().st_size / CHUNK)
    assert n > 4
    new = publish_partial(broker.url, art, CHUNK, [0, 1, 2])
    with SyncClient(broker_config(broker.url)) as c:
        payload = c.retained_one(topics.artifact_manifest(new), limit=5.0)
    assert payload is not None
    ann = decode(ArtifactAnnouncement, payload, MAX_ANNOUNCEMENT_BYTES)
    cmd = {
        "id": "d1",
        "op": "deploy",
        "name": "tiny",
        "version": "2.0.0",
        "sha256": new,
        "size": ann.size,
        "chunks_sha256": ann.table_digest(),
    }
    send(broker.url, topics.device_topic("m1", "cmd"), sealed_command("m1", cmd))
    listener.wait_event("m1", lambda e: e.get("state") == "FETCHING" and e["sha256"] == new)
    stuck = listener.wait_event("m1", lambda e: e["reason"].startswith("no chunk for"))
    assert stuck["state"] == "FETCHING" and "waiting for chunks 3.." in stuck["reason"]

    done = _cli(capsys, "prune", "--broker", broker.url, "--keep", "0")
    assert [a["sha256"] for a in done["remove"]] == [new]  # 1.0.0 is deployed: kept
    rej = listener.wait_state("m1", "REJECTED", new, timeout=30)
    assert "not delivered after 3 tries (pruned from the broker?)" in rej["reason"]
    assert rej["reason"].startswith("chunks 3..")
    state_dir: Path = agents.state_dir("m1")
    assert not any((state_dir / "downloads").glob(f"{new}*"))  # no half download left
    assert active_sha(state_dir) == old and p.alive()

    # published and deployed again: installed
    publish(broker.url, art, CHUNK)
    send(
        broker.url,
        topics.device_topic("m1", "cmd"),
        sealed_command("m1", {**cmd, "id": "d2"}),
    )
    listener.wait_state("m1", "HEALTHY", new, timeout=60)
