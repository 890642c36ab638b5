"""The agent's state machine through the in-memory transport: a deploy, and arbitrary payloads on
every topic it subscribes to (hypothesis) never crash it or disturb the active model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.policy import resolve_policy
from agent.protocol import topics
from agent.protocol.messages import encode
from agent.transport.fake import FakeTransport
from fleet.publish import announcement
from tests.agent_helpers import TIME_SCALE, make_artifact, make_keys, sealed_for, write_config

CHUNK = 1024


def _publish(fake: FakeTransport, art: Path) -> str:
    ann = announcement(art, CHUNK)
    data = art.read_bytes()
    for i in range(len(ann.chunks)):
        fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[i * CHUNK : (i + 1) * CHUNK]
    fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
    return ann.sha256


def _events(fake: FakeTransport) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in fake.published if t.endswith("/events")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fake")
    keys = make_keys(tmp / "keys")
    cfg_path = write_config(
        tmp / "agent.toml",
        "dev",
        "mqtt://127.0.0.1:1",
        [keys.public],
        tmp / "state",
        groups=("lab",),
        probation_s=0.0,
    )
    cfg = load_config(cfg_path)
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    agent.start()
    sha1 = _publish(fake, make_artifact(tmp, keys, version="1.0.0"))
    fake.inject(
        topics.group_deployment("lab"),
        sealed_for(fake.retained[topics.artifact_manifest(sha1)], "tiny", "1.0.0", group="lab"),
        retain=True,
    )
    agent.drain()
    agent.step(0)
    states = [e["state"] for e in _events(fake) if e["sha256"] == sha1]
    states = [
        s for i, s in enumerate(states) if i == 0 or states[i - 1] != s
    ]  # progress repeats FETCHING
    assert states == ["FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE", "HEALTHY"]
    # a second artifact whose chunks never arrive keeps a fetch (manifest + chunk topics) open
    art2 = make_artifact(tmp, keys, version="1.1.0", seed=1)
    ann2 = announcement(art2, CHUNK)
    fake.retained[topics.artifact_manifest(ann2.sha256)] = encode(ann2)
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(
            fake.retained[topics.artifact_manifest(ann2.sha256)], "tiny", "1.1.0", device="dev"
        ),
        retain=True,
    )
    agent.drain()
    assert agent.job is not None and agent.job.inflight
    subscribed = sorted(fake.subscriptions)
    assert (
        topics.artifact_manifest(ann2.sha256) in subscribed
        or topics.artifact_chunk(ann2.sha256, 0) in subscribed
    )
    extra = [
        topics.artifact_manifest(ann2.sha256),
        topics.artifact_chunk(ann2.sha256, 0),
        topics.artifact_chunk("f" * 64, 3),
        "edgefleet/v1/devices/other/cmd",
        "not/ours",
    ]
    return {
        "agent": agent,
        "fake": fake,
        "sha1": sha1,
        "sha2": ann2.sha256,
        "topics": subscribed + extra,
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=20,
)
valid_keys = [
    "name",
    "version",
    "sha256",
    "profile",
    "deployed_at",
    "id",
    "op",
    "size",
    "chunk_size",
    "chunks",
    "manifest",
    "signature",
    "runtime",
    "format_version",
]
payloads = (
    st.binary(max_size=2048)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(valid_keys), json_values, max_size=8).map(
        lambda d: json.dumps(d).encode()
    )
    | st.just(b"x" * 5_000_000)
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), payload=payloads)
def test_arbitrary_payloads_on_every_topic(
    setup: dict[str, Any], data: st.DataObject, payload: bytes
) -> None:
    agent: Agent = setup["agent"]
    fake: FakeTransport = setup["fake"]
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict) and doc.get("op") == "rollback":
            return  # a valid rollback command is allowed to change the active model
    except ValueError:
        pass
    topic = data.draw(st.sampled_from(setup["topics"]))
    before = len(fake.published)
    fake.deliver(topic, payload)
    agent.drain()
    assert agent.active is not None and agent.active.sha256 == setup["sha1"]
    assert agent.session is not None
    assert agent.installer.probe() is None  # still serves correct outputs
    new = [json.loads(p) for t, p, _ in fake.published[before:] if t.endswith("/events")]
    for ev in new:
        if ev["kind"] == "bad_message" or ev.get("state") in ("REJECTED", "ROLLED_BACK"):
            assert ev["reason"]


def test_probation_failure_rolls_back(tmp_path: Path) -> None:
    import time

    import numpy as np

    keys = make_keys(tmp_path / "keys")
    cfg = load_config(
        write_config(
            tmp_path / "agent.toml",
            "dev",
            "mqtt://127.0.0.1:1",
            [keys.public],
            tmp_path / "state",
            probation_s=0.5,
            probation_interval_s=0.05,
        )
    )
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    agent.start()

    def run_until(state: str, sha: str) -> None:
        deadline = (
            time.monotonic() + 60 * TIME_SCALE
        )  # a give-up point: a loaded 2-core runner needed >20 s
        while not any(e["state"] == state and e["sha256"] == sha for e in _events(fake)):
            assert time.monotonic() < deadline, [(e["state"], e["reason"]) for e in _events(fake)]
            agent.step(0.02)

    sha1 = _publish(fake, make_artifact(tmp_path, keys, version="1.0.0"))
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(fake.retained[topics.artifact_manifest(sha1)], "tiny", "1.0.0", device="dev"),
        retain=True,
    )
    run_until("HEALTHY", sha1)
    sha2 = _publish(fake, make_artifact(tmp_path, keys, version="2.0.0", seed=1))
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(fake.retained[topics.artifact_manifest(sha2)], "tiny", "2.0.0", device="dev"),
        retain=True,
    )
    run_until("ACTIVE", sha2)
    assert agent.session is not None
    real = agent.session.infer
    agent.session.infer = lambda feeds: {k: np.full_like(v, np.nan) for k, v in real(feeds).items()}  # type: ignore[method-assign]
    run_until("ROLLED_BACK", sha2)
    ev = next(e for e in _events(fake) if e["state"] == "ROLLED_BACK")
    assert "probation failed" in ev["reason"] and "non-finite" in ev["reason"]
    assert agent.active is not None and agent.active.sha256 == sha1
    assert agent.versions.active() == agent.active
    # the rolled-back artifact is not fetched again for the same deployment
    agent.drain()
    assert agent.job is None


def test_stray_bad_chunk_is_survived(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    cfg = load_config(
        write_config(
            tmp_path / "agent.toml",
            "dev",
            "mqtt://127.0.0.1:1",
            [keys.public],
            tmp_path / "state",
            probation_s=0.0,
        )
    )
    fake = FakeTransport()
    agent = Agent(cfg, resolve_policy(cfg), fake)
    agent.start()
    sha = _publish(fake, make_artifact(tmp_path, keys, version="1.0.0"))
    chunk0 = topics.artifact_chunk(sha, 0)
    good = fake.retained.pop(chunk0)
    fake.inject(
        topics.device_topic("dev", "deployment"),
        sealed_for(fake.retained[topics.artifact_manifest(sha)], "tiny", "1.0.0", device="dev"),
        retain=True,
    )
    agent.drain()
    assert agent.job is not None and 0 in agent.job.inflight
    fake.inject(chunk0, b"\0" * len(good))  # not retained: a stray message
    agent.drain()
    bad = [e for e in _events(fake) if e["kind"] == "bad_message"]
    assert bad and "chunk 0 sha256" in bad[-1]["reason"]
    fake.inject(chunk0, good, retain=True)
    agent.drain()
    agent.step(0)
    assert agent.active is not None and agent.active.sha256 == sha
