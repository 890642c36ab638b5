"""A fetch that stops making progress says so (FETCHING events with a reason, the pending
deployment in status and the state message) and, when chunks stop coming, gives up cleanly:
REJECTED with a reason, the partial download gone, the old model serving, a re-deploy retried."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.fetch import ranges
from agent.deploy.policy import resolve_policy
from agent.protocol import topics
from agent.protocol.messages import StateMessage, decode, encode
from agent.transport.fake import FakeTransport
from fleet.publish import announcement
from tests.agent_helpers import TIME_SCALE, make_artifact, make_keys, sealed_for, write_config

CHUNK = 1024
STALL_S = 0.1
TRIES = 3


def _agent(tmp: Path) -> tuple[Agent, FakeTransport, Any]:
    keys = make_keys(tmp / "keys")
    cfg = load_config(
        write_config(
            tmp / "agent.toml",
            "dev",
            "mqtt://127.0.0.1:1",
            [keys.public],
            tmp / "state",
            probation_s=0.0,
            transfer={"stall_s": STALL_S, "stall_tries": TRIES},
        )
    )
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    agent.start()
    return agent, fake, keys


def _events(fake: FakeTransport) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in fake.published if t.endswith("/events")]


def _state(fake: FakeTransport) -> StateMessage:
    return decode(StateMessage, fake.retained[topics.device_topic("dev", "state")])


def _until(agent: Agent, fake: FakeTransport, pred: Any, limit: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit * TIME_SCALE
    while True:
        for ev in _events(fake):
            if pred(ev):
                return ev
        assert time.monotonic() < deadline, [(e["state"], e["reason"]) for e in _events(fake)]
        agent.step(0.02)


def _deploy(fake: FakeTransport, ann: bytes, version: str, deployed_at: str = "") -> None:
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(ann, "tiny", version, device="dev", deployed_at=deployed_at),
        retain=True,
    )


def test_ranges() -> None:
    assert ranges([3, 4, 5, 9, 11, 12]) == "3..5, 9, 11..12"
    assert ranges([0]) == "0" and ranges([]) == ""


def test_missing_manifest_is_reported_not_silent(tmp_path: Path) -> None:
    agent, fake, keys = _agent(tmp_path)
    art = make_artifact(tmp_path, keys, version="1.0.0")
    ann = announcement(art, CHUNK)
    _deploy(fake, encode(ann), "1.0.0")  # the artifact is not on the broker
    agent.drain()
    t0 = time.monotonic()
    ev = _until(agent, fake, lambda e: "for the manifest of" in e["reason"])
    assert ev["kind"] == "deployment" and ev["state"] == "FETCHING"
    assert ev["sha256"] == ann.sha256 and "(not on the broker?)" in ev["reason"]
    assert ev["detail"]["waiting"] == "manifest"
    pend = agent.status()["pending"]
    assert pend["sha256"] == ann.sha256 and pend["waiting"] == "manifest"
    assert pend["name"] == "tiny" and pend["version"] == "1.0.0" and pend["age_s"] >= STALL_S
    state = _state(fake)  # the retained state carries it too
    assert state.pending is not None and state.pending.sha256 == ann.sha256
    # at most one event per stall period
    while time.monotonic() - t0 < 5 * STALL_S:
        agent.step(0.01)
    stuck = [e for e in _events(fake) if "for the manifest of" in e["reason"]]
    assert 1 <= len(stuck) <= (time.monotonic() - t0) / STALL_S + 1
    # published later: installed, and nothing is pending any more
    data = art.read_bytes()
    for i in range(len(ann.chunks)):
        fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[i * CHUNK : (i + 1) * CHUNK]
    fake.inject(topics.artifact_manifest(ann.sha256), encode(ann), retain=True)
    _until(agent, fake, lambda e: e["state"] == "HEALTHY")
    assert agent.status()["pending"] is None
    assert _state(fake).pending is None
    raw = json.loads(fake.retained[topics.device_topic("dev", "state")])
    assert "pending" not in raw  # absent, not null: older strict collectors still read it


def test_pruned_chunks_give_up_cleanly_and_a_redeploy_retries(tmp_path: Path) -> None:
    agent, fake, keys = _agent(tmp_path)
    old = announcement(art1 := make_artifact(tmp_path, keys, version="1.0.0"), CHUNK)
    data1 = art1.read_bytes()
    for i in range(len(old.chunks)):
        fake.retained[topics.artifact_chunk(old.sha256, i)] = data1[i * CHUNK : (i + 1) * CHUNK]
    fake.retained[topics.artifact_manifest(old.sha256)] = encode(old)
    _deploy(fake, encode(old), "1.0.0")
    _until(agent, fake, lambda e: e["state"] == "HEALTHY")

    art2 = make_artifact(tmp_path, keys, version="2.0.0", seed=1)
    new = announcement(art2, CHUNK)
    data2 = art2.read_bytes()
    n = len(new.chunks)
    assert n > 4
    for i in range(3):  # chunks 3.. were pruned while the device fetched
        fake.retained[topics.artifact_chunk(new.sha256, i)] = data2[i * CHUNK : (i + 1) * CHUNK]
    fake.retained[topics.artifact_manifest(new.sha256)] = encode(new)
    _deploy(fake, encode(new), "2.0.0", deployed_at="a")
    stuck = _until(agent, fake, lambda e: e["reason"].startswith("no chunk for"))
    assert stuck["state"] == "FETCHING" and f"of {new.sha256[:16]}" in stuck["reason"]
    assert agent.status()["pending"]["waiting"] == "chunks"
    rej = _until(agent, fake, lambda e: e["state"] == "REJECTED")
    assert rej["sha256"] == new.sha256
    assert f"not delivered after {TRIES} tries (pruned from the broker?)" in rej["reason"]
    assert rej["reason"].startswith(f"chunks 3..{min(n - 1, 10)}")
    # a clear state: nothing in flight or half-downloaded, the old model serves, nothing pending
    assert agent.job is None and agent.status()["pending"] is None
    assert not any(f.name.startswith(new.sha256) for f in agent.downloads.iterdir())
    assert agent.active is not None and agent.active.sha256 == old.sha256
    assert agent.installer.probe() is None
    assert new.sha256 not in agent.rejected  # not a refusal remembered in agent.json
    assert not agent.machine.illegal
    # the same deployment delivered again is not fetched again in a loop
    before = len(fake.published)
    _deploy(fake, encode(new), "2.0.0", deployed_at="a")
    agent.drain()
    assert agent.job is None and not any(
        t.endswith("/events") for t, _p, _r in fake.published[before:]
    )
    # re-published and re-deployed: installed
    for i in range(n):
        fake.retained[topics.artifact_chunk(new.sha256, i)] = data2[i * CHUNK : (i + 1) * CHUNK]
    _deploy(fake, encode(new), "2.0.0", deployed_at="b")
    _until(agent, fake, lambda e: e["state"] == "HEALTHY" and e["sha256"] == new.sha256)
    assert agent.active is not None and agent.active.sha256 == new.sha256


def test_stalls_while_disconnected_do_not_count(tmp_path: Path) -> None:
    agent, fake, keys = _agent(tmp_path)
    art = make_artifact(tmp_path, keys, version="1.0.0")
    ann = announcement(art, CHUNK)
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    _deploy(fake, encode(ann), "1.0.0")
    agent.drain()
    assert agent.job is not None and agent.job.ann is not None
    fake.connected = False
    end = time.monotonic() + (TRIES + 2) * STALL_S
    while time.monotonic() < end:
        agent.step(0.02)
    assert agent.job is not None and agent.job.stalls == 0
    assert not any(e["state"] == "REJECTED" for e in _events(fake))
