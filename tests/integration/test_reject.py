"""Artifacts the agent must refuse, and failures that must roll back; the old model keeps serving."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import topics
from agent.protocol.messages import encode
from fleet.publish import announcement
from tests.agent_helpers import (
    Broker,
    Listener,
    active_sha,
    deploy,
    make_artifact,
    publish,
    rewrite_tar,
    sealed_command,
    send,
    set_deployment,
)

pytestmark = pytest.mark.integration


def _install_v1(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, device: str
) -> str:
    sha1 = publish(broker.url, artifacts(version="1.0.0"))
    agents.start(device)
    deploy(broker.url, "tiny@1.0.0", device=device)
    listener.wait_state(device, "HEALTHY", sha1, timeout=30)
    return sha1


def _rejected(listener: Listener, device: str, sha: str, state: str = "REJECTED") -> str:
    ev = listener.wait_state(device, state, sha, timeout=30)
    assert ev["reason"]
    return str(ev["reason"])


def test_corrupted_chunk_rejected(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha1 = _install_v1(broker, listener, agents, artifacts, "d1")
    art = artifacts(version="1.1.0", seed=1)
    sha2 = publish(broker.url, art)
    send(broker.url, topics.artifact_chunk(sha2, 1), b"\x00" * 1024, retain=True)
    deploy(broker.url, "tiny@1.1.0", device="d1")
    assert "chunk 1 sha256 does not match the chunk table (3 times)" in _rejected(
        listener, "d1", sha2
    )
    assert active_sha(agents.state_dir("d1")) == sha1
    assert not list((agents.state_dir("d1") / "downloads").glob(f"{sha2}*"))


def test_bad_signature_and_unknown_key_and_unsigned(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, other_keys: Any, tmp_path: Path
) -> None:
    sha1 = _install_v1(broker, listener, agents, artifacts, "d2")
    good = artifacts(version="1.2.0", seed=2)

    def tamper(name: str, data: bytes) -> bytes:
        if name == "manifest.json":
            doc = json.loads(data)
            doc["precision"] = "int8"
            return json.dumps(doc).encode()
        return data

    tampered = rewrite_tar(good, tmp_path / "tampered.efa", tamper)
    sha_t = publish(broker.url, tampered)
    set_deployment(broker.url, "d2", "tiny", "1.2.0", sha_t)
    assert "bad signature" in _rejected(listener, "d2", sha_t)

    foreign = make_artifact(tmp_path, other_keys, version="1.3.0", seed=3)
    sha_f = publish(broker.url, foreign)
    set_deployment(broker.url, "d2", "tiny", "1.3.0", sha_f)
    assert "is not a release key in trust document" in _rejected(listener, "d2", sha_f)

    # unsigned: the publisher refuses it, so announce it by hand with an empty signature
    unsigned_src = artifacts(version="1.4.0", seed=4)
    sha_u = publish(broker.url, unsigned_src)
    ann = announcement(unsigned_src, 1024).model_copy(update={"signature": ""})
    send(broker.url, topics.artifact_manifest(sha_u), encode(ann), retain=True)
    set_deployment(broker.url, "d2", "tiny", "1.4.0", sha_u)
    assert "manifest.sig is malformed" in _rejected(listener, "d2", sha_u)
    assert active_sha(agents.state_dir("d2")) == sha1


def test_other_profile_and_older_version_and_rollback_command(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha1 = _install_v1(broker, listener, agents, artifacts, "d3")
    sha_p = publish(broker.url, artifacts(version="2.0.0", profile="other-cpu", seed=5))
    set_deployment(broker.url, "d3", "tiny", "2.0.0", sha_p)
    assert "profile 'other-cpu'" in _rejected(listener, "d3", sha_p)

    sha2 = publish(broker.url, artifacts(version="1.1.0", seed=1))
    deploy(broker.url, "tiny@1.1.0", device="d3")
    listener.wait_state("d3", "HEALTHY", sha2, timeout=30)
    sha_old = publish(broker.url, artifacts(version="0.9.0", seed=6))
    deploy(broker.url, "tiny@0.9.0", device="d3")
    assert "older than 1.1.0, activated on this device before" in _rejected(listener, "d3", sha_old)
    assert active_sha(agents.state_dir("d3")) == sha2

    # the explicit way back
    cid = uuid.uuid4().hex
    send(
        broker.url,
        topics.device_topic("d3", "cmd"),
        sealed_command("d3", {"id": cid, "op": "rollback"}),
    )
    ev = listener.wait_state("d3", "ROLLED_BACK", sha2, timeout=30)
    assert ev["detail"]["active"] == "tiny@1.0.0"
    assert active_sha(agents.state_dir("d3")) == sha1
    res = listener.wait_message(
        topics.device_topic("d3", "cmd/result"), lambda r: r["id"] == cid, timeout=10
    )
    assert res["ok"] is True


def test_path_traversal_tar_rejected(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, tmp_path: Path
) -> None:
    sha1 = _install_v1(broker, listener, agents, artifacts, "d4")
    evil = rewrite_tar(
        artifacts(version="1.5.0", seed=7),
        tmp_path / "evil.efa",
        lambda n, d: d,
        extra={"../evil.txt": b"owned"},
    )
    sha_e = publish(broker.url, evil)
    set_deployment(broker.url, "d4", "tiny", "1.5.0", sha_e)
    assert "not a plain top-level file name" in _rejected(listener, "d4", sha_e)
    sd = agents.state_dir("d4")
    assert not list(sd.parent.rglob("evil.txt"))
    assert active_sha(sd) == sha1


def test_failed_self_test_rolls_back(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha1 = _install_v1(broker, listener, agents, artifacts, "d5")
    sha_b = publish(broker.url, artifacts(version="1.6.0", seed=8, bad_golden=True))
    deploy(broker.url, "tiny@1.6.0", device="d5")
    reason = _rejected(listener, "d5", sha_b, "ROLLED_BACK")
    assert "self-test failed" in reason
    sd = agents.state_dir("d5")
    assert active_sha(sd) == sha1
    assert not [p for p in (sd / "versions").iterdir() if p.name.startswith("1.6.0")]


def test_latency_budget_rolls_back(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    sha = publish(broker.url, artifacts(version="1.0.0"))
    agents.start("d6", max_p95_ms=1e-6)
    deploy(broker.url, "tiny@1.0.0", device="d6")
    assert "exceeds the budget" in _rejected(listener, "d6", sha, "ROLLED_BACK")
    assert active_sha(agents.state_dir("d6")) is None
