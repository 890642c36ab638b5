"""The control plane holds against a real mosquitto and real agent processes: unsigned, foreign,
expired, tampered, replayed and mis-targeted deployments and commands, anti-rollback across
restarts, the security floor, a forged announcement that would fill the disk, key revocation, and
stale or foreign trust documents. Each attack is refused with its reason in an event."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.clikit import main as edgefleet
from agent.protocol import topics
from agent.protocol.messages import (
    MAX_ANNOUNCEMENT_BYTES,
    MAX_CHUNK_SIZE,
    ArtifactAnnouncement,
    Deployment,
    decode,
)
from agent.protocol.signing import generate_keypair, read_trusted_key
from fleet.trust import Operator, init_root, renew
from tests.agent_helpers import (
    TIME_SCALE,
    Broker,
    Keys,
    Listener,
    active_sha,
    deploy,
    operator,
    publish,
    sealed_command,
    sealed_deployment,
    sealed_for,
    send,
    set_deployment,
    trust_for,
    trust_root,
)

pytestmark = pytest.mark.integration

DEV = "dev1"
CMD = topics.device_topic(DEV, "cmd")
DEP = topics.device_topic(DEV, "deployment")


class Watch:
    """Events and command results of one device, waited on from a mark onwards."""

    def __init__(self, listener: Listener, device: str = DEV) -> None:
        self.l, self.dev, self.n = listener, device, 0

    def mark(self) -> None:
        self.n = len(self.l.events(self.dev))

    def event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout * TIME_SCALE
        while True:
            for ev in self.l.events(self.dev)[self.n :]:
                if pred(ev):
                    return ev
            if time.monotonic() > deadline:
                got = [
                    (e["kind"], e.get("state"), e.get("reason"))
                    for e in self.l.events(self.dev)[self.n :]
                ]
                raise AssertionError(f"no matching event for {self.dev}; since the mark: {got}")
            time.sleep(0.05)

    def refused(self, text: str, timeout: float = 30.0) -> dict[str, Any]:
        """The bad_message event whose reason holds ``text``."""
        return self.event(lambda e: e["kind"] == "bad_message" and text in e["reason"], timeout)

    def state(self, state: str, text: str = "", sha: str | None = None) -> dict[str, Any]:
        return self.event(
            lambda e: (
                e.get("state") == state
                and text in e["reason"]
                and (sha is None or e.get("sha256") == sha)
            )
        )

    def result(self, cmd_id: str) -> dict[str, Any]:
        return self.l.wait_message(
            topics.device_topic(self.dev, "cmd/result"), lambda d: d.get("id") == cmd_id, timeout=15
        )

    def states(self) -> list[dict[str, Any]]:
        topic = topics.device_topic(self.dev, "state")
        with self.l._cv:
            return [json.loads(p) for t, p in self.l.messages if t == topic]

    def online(self, after: int = 0) -> dict[str, Any]:
        """The first birth message among the state messages from index ``after`` on."""
        deadline = time.monotonic() + 30 * TIME_SCALE
        while True:
            births = [s for s in self.states()[after:] if s["online"]]
            if births:
                return births[0]
            assert time.monotonic() < deadline, f"{self.dev} did not come online"
            time.sleep(0.05)


def kid(keys: Keys) -> str:
    return read_trusted_key(keys.public).key_id


def retained(broker: Broker, topic: str) -> bytes:
    from fleet.mqtt import SyncClient, broker_config

    with SyncClient(broker_config(broker.url)) as c:
        payload = c.retained_one(topic, limit=5.0)
    assert payload is not None, topic
    return payload


def restart(agents: Any, watch: Watch) -> dict[str, Any]:
    """Stop the device's agent and start it again; return its birth message once it is back."""
    for p in agents.procs:
        p.stop()
    agents.procs.clear()
    n = len(watch.states())
    agents.start(DEV)
    return watch.online(after=n)


def keys_cmd(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    rc = edgefleet(["keys", *args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------ a, b


def test_unsigned_foreign_expired_tampered_replayed_and_mis_targeted_messages_refused(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any, keys: Keys, tmp_path: Path
) -> None:
    shas = [
        publish(broker.url, artifacts(version=v, seed=i)) for i, v in enumerate(("1.0.0", "1.1.0"))
    ]
    agents.start(DEV)
    w = Watch(listener)
    sd = agents.state_dir(DEV)
    for v, sha in zip(("1.0.0", "1.1.0"), shas, strict=True):
        deploy(broker.url, f"tiny@{v}", device=DEV)
        listener.wait_state(DEV, "HEALTHY", sha)
    w.mark()

    # a. A plain JSON rollback command, as before commands were signed.
    send(broker.url, CMD, b'{"id": "x", "op": "rollback", "version": "1.0.0"}')
    reason = "unsigned message (deployments and commands must be signed envelopes)"
    w.refused(reason)
    assert w.result("x") == {"id": "x", "ok": False, "reason": reason, "detail": {}}

    # b. Signed, but not by an operator key of the trust document.
    release = Operator(keys.private)
    send(broker.url, CMD, release.command(DEV, {"id": "rel", "op": "rollback"}))
    w.refused(f"command refused: key {kid(keys)} is a release key, not an operator key")
    assert w.result("rel")["ok"] is False
    generate_keypair(tmp_path / "foreign", "foreign")
    foreign = Operator(tmp_path / "foreign" / "foreign.key")
    send(broker.url, CMD, foreign.command(DEV, {"id": "for", "op": "rollback"}))
    w.refused(f"command refused: key {foreign.key_id} is not an operator key in trust document v2")
    assert w.result("for")["ok"] is False

    # An expired command, and one modified after signing.
    send(broker.url, CMD, operator().command(DEV, {"id": "old", "op": "rollback"}, ttl_s=-60))
    w.refused("command expired at")
    tampered = json.loads(sealed_command(DEV, {"id": "tam", "op": "rebirth"}))
    tampered["signed"]["body"] = {"id": "tam", "op": "rollback", "version": "1.0.0"}
    send(broker.url, CMD, json.dumps(tampered).encode())
    w.refused("command has a bad signature (modified after signing)")
    # A command signed for another device, published on this one's topic.
    send(broker.url, CMD, sealed_command("dev2", {"id": "mis", "op": "rollback"}))
    w.refused("command is for device dev2, not device dev1")
    assert active_sha(sd) == shas[1]

    # Deployments: for another device, for a group, by the release key, expired.
    ann0 = retained(broker, topics.artifact_manifest(shas[0]))
    send(broker.url, DEP, sealed_for(ann0, "tiny", "1.0.0", device="dev2"), retain=True)
    w.refused("deployment is for device dev2, not device dev1")
    send(broker.url, DEP, sealed_for(ann0, "tiny", "1.0.0", group="lab"), retain=True)
    w.refused("deployment is for group lab, not device dev1")
    body = json.loads(sealed_for(ann0, "tiny", "1.0.0", device=DEV))["signed"]["body"]
    from agent.protocol.trust import Target

    send(broker.url, DEP, release.deployment(Target(device=DEV), body), retain=True)
    w.refused(f"deployment refused: key {kid(keys)} is a release key, not an operator key")
    send(broker.url, DEP, operator().deployment(Target(device=DEV), body, ttl_s=-1), retain=True)
    w.refused("deployment expired at")
    assert active_sha(sd) == shas[1]
    assert not [e for e in listener.events(DEV)[w.n :] if e["kind"] == "deployment"]

    # Replay: a real signed rollback is captured; acted on once, then never again.
    captured = sealed_command(DEV, {"id": "rb", "op": "rollback", "version": "1.0.0"})
    send(broker.url, CMD, captured)
    assert w.result("rb")["ok"] is True
    w.state("ROLLED_BACK", "rollback requested by command rb", shas[1])
    assert active_sha(sd) == shas[0]
    w.mark()
    send(broker.url, CMD, captured)  # the same envelope again: already acted on
    w.refused("already acted on")
    send(broker.url, CMD, sealed_command(DEV, {"id": "st", "op": "status"}))
    assert w.result("st")["ok"] is True
    send(broker.url, CMD, captured)  # replayed after a newer command
    w.refused("replayed or out of order")
    assert active_sha(sd) == shas[0]
    assert not [e for e in listener.events(DEV)[w.n :] if e.get("state") == "ROLLED_BACK"]


# ------------------------------------------------------------------------------ c


def test_anti_rollback_holds_across_lines_and_restarts_and_the_floor_blocks_rollback(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    t10 = publish(broker.url, artifacts(version="1.0.0"))
    t11 = publish(broker.url, artifacts(version="1.1.0", seed=1, security_floor="1.1.0"))
    b10 = publish(broker.url, artifacts(name="tinyb", version="1.0.0", seed=2))
    agents.start(DEV, keep_versions=2)
    w = Watch(listener)
    sd = agents.state_dir(DEV)
    set_deployment(broker.url, DEV, "tiny", "1.0.0", t10)
    listener.wait_state(DEV, "HEALTHY", t10)
    set_deployment(broker.url, DEV, "tiny", "1.1.0", t11)
    listener.wait_state(DEV, "HEALTHY", t11)
    assert json.loads((sd / "lines.json").read_text())["tiny"] == {
        "highest": "1.1.0",
        "floor": "1.1.0",
    }

    # The floor: a kept version below it is not rolled back to, named or as the previous one.
    w.mark()
    for cid, body in (("f1", {"version": "1.0.0"}), ("f2", {})):
        send(broker.url, CMD, sealed_command(DEV, {"id": cid, "op": "rollback", **body}))
        res = w.result(cid)
        assert res["ok"] is False
        assert (
            res["reason"]
            == "cannot roll back to tiny@1.0.0: tiny 1.0.0 is below the security floor 1.1.0"
        )
    assert active_sha(sd) == t11

    # Another line in between, then the old version of the first line.
    set_deployment(broker.url, DEV, "tinyb", "1.0.0", b10)
    listener.wait_state(DEV, "HEALTHY", b10)
    older = "tiny 1.0.0 is older than 1.1.0, activated on this device before"
    set_deployment(broker.url, DEV, "tiny", "1.0.0", t10)
    w.state("REJECTED", older, t10)
    assert active_sha(sd) == b10

    restart(agents, w)
    w.mark()
    set_deployment(broker.url, DEV, "tiny", "1.0.0", t10)  # a new deployment: tried again
    w.state("REJECTED", older, t10)
    send(
        broker.url,
        CMD,
        sealed_command(DEV, {"id": "f3", "op": "rollback", "version": "tiny@1.0.0"}),
    )
    res = w.result("f3")
    assert res["ok"] is False and "below the security floor 1.1.0" in res["reason"]
    assert active_sha(sd) == b10


# ------------------------------------------------------------------------------ d


def test_forged_announcement_cannot_fill_the_disk(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    art = artifacts(version="1.0.0")
    sha = publish(broker.url, art)
    manifest_topic = topics.artifact_manifest(sha)
    genuine = retained(broker, manifest_topic)
    ann = decode(ArtifactAnnouncement, genuine, MAX_ANNOUNCEMENT_BYTES)
    agents.start(DEV)
    w = Watch(listener)
    w.online()
    downloads = agents.state_dir(DEV) / "downloads"

    def attempt(announcement: bytes, deployment: bytes, reason: str) -> None:
        send(broker.url, manifest_topic, announcement, retain=True)
        w.mark()
        send(broker.url, DEP, deployment, retain=True)
        w.state("REJECTED", reason, sha)
        sizes = [f.stat().st_size for f in downloads.iterdir()]
        assert all(s <= art.stat().st_size for s in sizes), sizes

    big = 100_000_000_000
    forged = json.loads(genuine)
    forged.update(
        size=big, chunk_size=MAX_CHUNK_SIZE, chunks=[{"size": MAX_CHUNK_SIZE, "sha256": "ab" * 32}]
    )
    forged_big = json.dumps(forged).encode()
    dep = sealed_for(genuine, "tiny", "1.0.0", device=DEV, deployed_at="1")
    attempt(
        forged_big,
        dep,
        f"announced size {big} differs from the {ann.size} bytes the deployment signed",
    )

    # The genuine size with a forged chunk table (chunks that would never verify).
    forged = json.loads(genuine)
    forged["chunks"][0]["sha256"] = "cd" * 32
    dep = sealed_for(genuine, "tiny", "1.0.0", device=DEV, deployed_at="2")
    attempt(
        json.dumps(forged).encode(),
        dep,
        "announced chunk table differs from the one the deployment signed",
    )

    # A deployment whose signed size differs from the genuine announcement.
    lie = Deployment(
        name="tiny",
        version="1.0.0",
        sha256=sha,
        size=big,
        chunks_sha256=ann.table_digest(),
        deployed_at="3",
    )
    attempt(
        genuine,
        sealed_deployment(DEV, lie),
        f"announced size {ann.size} differs from the {big} bytes the deployment signed",
    )

    # The device is not wedged: the genuine deployment installs.
    w.mark()
    send(
        broker.url,
        DEP,
        sealed_for(genuine, "tiny", "1.0.0", device=DEV, deployed_at="4"),
        retain=True,
    )
    w.state("HEALTHY", "", sha)


# ------------------------------------------------------------------------------ e


def test_revoked_release_key_rolls_back_then_stops_serving_also_after_restart(
    broker: Broker,
    listener: Listener,
    agents: Any,
    artifacts: Any,
    keys: Keys,
    other_keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a10 = publish(broker.url, artifacts(version="1.0.0"))  # release key A
    b11 = publish(broker.url, artifacts(version="1.1.0", seed=11, keys=other_keys))  # key B
    agents.start(DEV, keys=[keys.public, other_keys.public])
    w = Watch(listener)
    sd = agents.state_dir(DEV)
    set_deployment(broker.url, DEV, "tiny", "1.0.0", a10)
    listener.wait_state(DEV, "HEALTHY", a10)
    set_deployment(broker.url, DEV, "tiny", "1.1.0", b11)
    listener.wait_state(DEV, "HEALTHY", b11)
    work = agents.tmp / "root-trust.json"
    shutil.copy(agents.tmp / DEV / "trust" / "trust.json", work)
    root = (
        "--trust",
        str(work),
        "--root-key",
        str(trust_root() / "root.key"),
        "--broker",
        broker.url,
    )

    w.mark()
    assert keys_cmd(capsys, "revoke", str(other_keys.public), *root)["version"] == 3
    w.event(lambda e: e["reason"] == "trust document v3 accepted")
    ev = w.state(
        "ROLLED_BACK",
        f"tiny@1.1.0 may no longer serve: release key {kid(other_keys)} is revoked (trust document v3)",
        b11,
    )
    assert ev["detail"]["active"] == "tiny@1.0.0"
    assert active_sha(sd) == a10
    send(broker.url, CMD, sealed_command(DEV, {"id": "r1", "op": "rollback", "version": "1.1.0"}))
    res = w.result("r1")
    assert res["ok"] is False and "version 1.1.0 is not kept" in res["reason"]

    # A is revoked while the device is off; it starts serving 1.0.0, then takes the retained v4.
    for p in agents.procs:
        p.stop()
    agents.procs.clear()
    assert keys_cmd(capsys, "revoke", str(keys.public), *root)["version"] == 4
    w.mark()
    agents.start(DEV)
    ev = w.state(
        "ROLLED_BACK",
        f"tiny@1.0.0 may no longer serve: release key {kid(keys)} is revoked (trust document v4)",
        a10,
    )
    assert ev["detail"]["active"] is None
    listener.wait_message(
        topics.device_topic(DEV, "state"), lambda s: s["online"] and s["active"] is None, timeout=15
    )
    assert active_sha(sd) is None

    state = restart(agents, w)
    assert state["active"] is None and active_sha(sd) is None
    w.mark()
    send(broker.url, CMD, sealed_command(DEV, {"id": "r2", "op": "rollback"}))
    assert w.result("r2") == {
        "id": "r2",
        "ok": False,
        "reason": "no previous version to roll back to",
        "detail": {},
    }
    # A new deployment of a revoked key's artifact is refused before a chunk is fetched.
    set_deployment(broker.url, DEV, "tiny", "1.0.0", a10)
    w.state("REJECTED", f"artifact refused: key {kid(keys)} is revoked (trust document v4)", a10)
    assert active_sha(sd) is None


def test_rollback_to_a_kept_version_signed_by_a_revoked_key_is_refused(
    broker: Broker,
    listener: Listener,
    agents: Any,
    artifacts: Any,
    keys: Keys,
    other_keys: Keys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    b10 = publish(broker.url, artifacts(version="1.0.0", seed=10, keys=other_keys))  # key B
    a11 = publish(broker.url, artifacts(version="1.1.0", seed=1))  # key A
    agents.start(DEV, keys=[keys.public, other_keys.public])
    w = Watch(listener)
    sd = agents.state_dir(DEV)
    set_deployment(broker.url, DEV, "tiny", "1.0.0", b10)
    listener.wait_state(DEV, "HEALTHY", b10)
    set_deployment(broker.url, DEV, "tiny", "1.1.0", a11)
    listener.wait_state(DEV, "HEALTHY", a11)
    work = agents.tmp / "root-trust.json"
    shutil.copy(agents.tmp / DEV / "trust" / "trust.json", work)
    w.mark()
    keys_cmd(
        capsys,
        "revoke",
        kid(other_keys),
        "--trust",
        str(work),
        "--root-key",
        str(trust_root() / "root.key"),
        "--broker",
        broker.url,
    )
    w.event(lambda e: e["reason"] == "trust document v3 accepted")
    send(broker.url, CMD, sealed_command(DEV, {"id": "r", "op": "rollback", "version": "1.0.0"}))
    res = w.result("r")
    assert res["ok"] is False
    assert res["reason"] == (
        f"cannot roll back to tiny@1.0.0: release key {kid(other_keys)} is revoked (trust document v3)"
    )
    assert active_sha(sd) == a11
    assert not [e for e in listener.events(DEV)[w.n :] if e.get("state") == "ROLLED_BACK"]


# ------------------------------------------------------------------------------ f


def test_stale_or_foreign_trust_documents_refused(
    broker: Broker, listener: Listener, agents: Any, keys: Keys, tmp_path: Path
) -> None:
    agents.start(DEV)
    w = Watch(listener)
    w.online()
    sd = agents.state_dir(DEV)
    trust_topic = topics.trust()
    older = trust_for([keys.public], tmp_path / "older", version=1)
    send(broker.url, trust_topic, older.read_bytes(), retain=True)
    w.refused("trust document v1 is not newer than the one held (v2)")
    foreign = init_root(tmp_path / "foreign").trust
    for _ in range(8):
        renew(foreign, tmp_path / "foreign" / "root.key")
    send(broker.url, trust_topic, foreign.read_bytes(), retain=True)
    w.refused("trust document v9 is not signed by a trusted root key")
    # The test root's own document, re-signed by nobody: its signature swapped for a foreign one.
    doc = json.loads(trust_for([keys.public], tmp_path / "newer", version=5).read_bytes())
    doc["signatures"] = json.loads(foreign.read_bytes())["signatures"]
    send(broker.url, trust_topic, json.dumps(doc).encode(), retain=True)
    w.refused("trust document v5 is not signed by a trusted root key")
    send(broker.url, trust_topic, b"\xff not json", retain=True)
    w.refused("trust document is not UTF-8 JSON")
    assert json.loads((sd / "trust.json").read_bytes())["signed"]["version"] == 2
    # Still taking genuine commands under v2.
    send(broker.url, CMD, sealed_command(DEV, {"id": "ok", "op": "status"}))
    assert w.result("ok")["ok"] is True
