"""Hostile payloads through a real broker into a real agent: it stays up and keeps its model."""

from __future__ import annotations

import json
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import topics
from tests.agent_helpers import Broker, Listener, active_sha, check_loadable, deploy, publish

pytestmark = pytest.mark.integration

payloads = (
    st.binary(max_size=512)
    | st.dictionaries(
        st.sampled_from(["name", "version", "sha256", "id", "op", "size", "chunks", "x"]),
        st.none() | st.integers() | st.text(max_size=70) | st.lists(st.integers(), max_size=3),
        max_size=6,
    ).map(lambda d: json.dumps(d).encode())
    | st.just(b"\0" * 2_000_000)
)


def test_hostile_payloads_on_subscribed_topics(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha = publish(broker.url, artifacts(version="1.0.0"))
    proc = agents.start("fz", groups=("lab",))
    deploy(broker.url, "tiny@1.0.0", device="fz")
    listener.wait_state("fz", "HEALTHY", sha, timeout=30)
    targets = [
        topics.device_topic("fz", "deployment"),
        topics.group_deployment("lab"),
        topics.device_topic("fz", "cmd"),
        topics.artifact_manifest("a" * 64),
        topics.artifact_chunk(sha, 0),
    ]
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    sent: list[str] = []

    @settings(max_examples=40, deadline=None, database=None)
    @given(topic=st.sampled_from(targets), payload=payloads)
    def send(topic: str, payload: bytes) -> None:
        if b'"rollback"' in payload:
            return  # a valid rollback command may legitimately change the model
        c.publish(topic, payload, qos=1).wait_for_publish(10)
        sent.append(topic)

    try:
        send()
        # A status command sent last is answered only after everything before it was handled
        # (the broker keeps the agent's order, and its worker takes messages in turn).
        barrier = json.dumps({"id": "after-fuzz", "op": "status"}).encode()
        c.publish(topics.device_topic("fz", "cmd"), barrier, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
    listener.wait_message(
        topics.device_topic("fz", "cmd/result"), lambda d: d.get("id") == "after-fuzz", timeout=30
    )
    listener.wait_event("fz", lambda e: e["kind"] == "bad_message", timeout=20)
    assert proc.alive()
    assert active_sha(agents.state_dir("fz")) == sha
    assert check_loadable(agents.state_dir("fz")) == sha
    bad = [e for e in listener.events("fz") if e["kind"] == "bad_message"]
    assert bad and all(e["reason"] for e in bad)
    # and it still follows a real deployment afterwards
    sha2 = publish(broker.url, artifacts(version="1.1.0", seed=1))
    deploy(broker.url, "tiny@1.1.0", device="fz")
    listener.wait_state("fz", "HEALTHY", sha2, timeout=30)
