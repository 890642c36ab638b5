"""The device's trust state (agent.deploy.trust): trust documents taken and persisted, the
provisioned one verified on first use, counters that refuse replays across restarts, and the
anti-rollback lines (highest version activated, security floor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.deploy.trust import DeviceTrust, Lines
from agent.errors import ConfigError
from agent.protocol.manifest import (
    FORMAT_VERSION,
    Golden,
    Manifest,
    ModelInfo,
    Recipe,
    TensorSpec,
)
from agent.protocol.signing import generate_keypair, load_private_key, read_trusted_key
from agent.protocol.trust import Target, TrustError, format_time, sign_signed
from fleet.trust import init_root, renew, revoke
from tests.agent_helpers import make_keys, operator, trust_for, trust_root, write_config

DEV = Target(device="dev1")
CHANNEL = "edgefleet/v1/devices/dev1/cmd"


def pinned() -> list[Any]:
    return [read_trusted_key(trust_root() / "root.pub")]


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    rel = make_keys(tmp_path / "k", "release")
    doc = trust_for([rel.public], tmp_path / "prov")
    return {"state": tmp_path / "state", "doc": doc, "release": rel}


def device(setup: dict[str, Any], clock: Any = None) -> DeviceTrust:
    setup["state"].mkdir(exist_ok=True)
    kw = {"clock": clock} if clock is not None else {}
    return DeviceTrust(setup["state"], pinned(), setup["doc"], **kw)


def command(counter: int, body: dict[str, Any] | None = None, ttl: float = 600) -> bytes:
    """A command envelope with a chosen counter, signed by the test operator."""
    import time

    now = time.time()
    signed = {
        "type": "command",
        "target": {"device": "dev1"},
        "issued": format_time(now),
        "expires": format_time(now + ttl),
        "counter": counter,
        "body": body or {"id": f"c{counter}", "op": "status"},
    }
    key = load_private_key(trust_root() / "operator.key")
    return json.dumps({"signed": signed, "signatures": sign_signed(signed, [key])}).encode()


# ------------------------------------------------------------------------------ documents


def test_provisioned_document_is_taken_on_first_use_and_persisted(setup: dict[str, Any]) -> None:
    t = device(setup)
    assert not t.path.exists()  # nothing verified yet
    assert t.version == 2
    assert json.loads(t.path.read_bytes())["signed"]["version"] == 2
    assert [k.key_id for k in t.release_keys()] == [
        read_trusted_key(setup["release"].public).key_id
    ]


def test_newer_documents_replace_older_ones_and_survive_a_restart(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    t = device(setup)
    work = tmp_path / "work.json"
    shutil.copy(setup["doc"], work)
    root = trust_root() / "root.key"
    renew(work, root)  # v3
    assert t.update(work.read_bytes()) is True
    assert t.update(work.read_bytes()) is False  # the retained document again: no change
    with pytest.raises(TrustError, match=r"v2 is not newer than the one held \(v3\)"):
        t.update(setup["doc"].read_bytes())
    # Restarted with the same (older) provisioned file: the persisted v3 wins.
    assert device(setup).version == 3


def test_foreign_root_document_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    t = device(setup)
    foreign = init_root(tmp_path / "foreign").trust
    doc = json.loads(foreign.read_bytes())
    assert doc["signed"]["version"] == 1
    renew(foreign, tmp_path / "foreign" / "root.key")
    renew(foreign, tmp_path / "foreign" / "root.key")
    renew(foreign, tmp_path / "foreign" / "root.key")  # v4: newer, but not ours
    with pytest.raises(TrustError, match="v4 is not signed by a trusted root key"):
        t.update(foreign.read_bytes())
    assert t.version == 2


def test_bad_provisioned_signature_refuses_everything_with_a_reason(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    foreign = init_root(tmp_path / "foreign").trust
    setup["doc"] = foreign
    t = device(setup)  # shape only: a bad signature is found on first use, not at construction
    assert t.doc is None and t.version == 0
    assert t.release_keys() == []
    problem = t.release_problem()
    assert problem is not None and f"provisioned trust document {foreign}" in problem
    assert "not signed by a trusted root key" in problem
    with pytest.raises(TrustError, match=r"provisioned trust document .* not signed by a trusted"):
        t.open(command(1), "command", DEV, CHANNEL, 65536)
    with pytest.raises(ConfigError, match="not signed by a trusted root key"):
        t.verify_now()


def test_unreadable_or_malformed_provisioned_document_is_a_config_error(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    setup["doc"] = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="cannot read the trust document"):
        device(setup)
    bad = tmp_path / "bad.json"
    bad.write_text('{"signed": {}, "signatures": []}')
    setup["doc"] = bad
    with pytest.raises(ConfigError, match=f"{bad}: trust document: "):
        device(setup)


def test_check_config_fails_on_a_foreign_provisioned_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = make_keys(tmp_path / "k")
    cfg = write_config(
        tmp_path / "agent.toml", "dev1", "mqtt://127.0.0.1:1", [rel.public], tmp_path / "s"
    )
    assert main(["check-config", str(cfg)]) == 0
    assert "trust document v2" in capsys.readouterr().out
    foreign = init_root(tmp_path / "foreign").trust
    shutil.copy(foreign, tmp_path / "trust" / "trust.json")
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "provisioned trust document" in err and "not signed by a trusted root key" in err
    # A wrong pinned root key, the other way round.
    generate_keypair(tmp_path / "other", "root", force=True)
    text = cfg.read_text().replace(str(trust_root() / "root.pub"), str(tmp_path / "other/root.pub"))
    cfg.write_text(text)
    shutil.copy(trust_for([rel.public], tmp_path / "again"), tmp_path / "trust" / "trust.json")
    assert main(["check-config", str(cfg)]) == 2
    assert "not signed by a trusted root key" in capsys.readouterr().err


def test_expired_document_refuses_artifacts_and_envelopes(setup: dict[str, Any]) -> None:
    import time

    skew = [0.0]
    t = device(setup, clock=lambda: time.time() + skew[0])
    assert t.version == 2  # taken while valid
    skew[0] = 400 * 86_400.0  # a year and more later, never renewed
    assert t.release_keys() == []
    problem = t.release_problem()
    assert problem is not None and "trust document v2 expired at" in problem
    assert "edgefleet keys renew" in problem
    with pytest.raises(TrustError, match="trust document v2 expired at"):
        t.open(command(1), "command", DEV, CHANNEL, 65536)
    # Provisioned with a document that has already expired: refused on first use, with why.
    setup["state"] = setup["state"].with_name("state2")
    late = device(setup, clock=lambda: time.time() + 400 * 86_400)
    problem = late.release_problem()
    assert problem is not None and "provisioned trust document" in problem
    assert "v2 expired at" in problem


def test_revoked_and_removed_release_keys_stop_serving_expired_ones_do_not(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    t = device(setup)
    kid = read_trusted_key(setup["release"].public).key_id
    assert t.revoked(kid) is None
    assert t.revoked("") is None  # an artifact from before signatures carried a key id
    work = tmp_path / "work.json"
    shutil.copy(setup["doc"], work)
    revoke(work, trust_root() / "root.key", str(setup["release"].public))
    t.update(work.read_bytes())
    assert t.revoked(kid) == f"release key {kid} is revoked (trust document v3)"
    assert t.key_problem(kid, "release") == f"key {kid} is revoked (trust document v3)"
    unknown = "0123456789abcdef"
    assert t.revoked(unknown) == f"key {unknown} is no longer a release key (trust document v3)"


# ------------------------------------------------------------------------------ envelopes


def test_counters_refuse_replays_and_survive_a_restart(setup: dict[str, Any]) -> None:
    t = device(setup)
    first = command(10)
    env, new = t.open(first, "command", DEV, CHANNEL, 65536)
    assert new
    t.commit(CHANNEL, env)
    env2, new = t.open(first, "command", DEV, CHANNEL, 65536)
    assert not new and env2.digest() == env.digest()  # the same envelope redelivered
    with pytest.raises(TrustError, match=r"counter 9 is not above the last one acted on \(10\)"):
        t.open(command(9), "command", DEV, CHANNEL, 65536)
    # Same counter, different content: not the envelope acted on, so a replay, not a redelivery.
    with pytest.raises(TrustError, match="replayed or out of order"):
        t.open(command(10, {"id": "other", "op": "rebirth"}), "command", DEV, CHANNEL, 65536)
    # Counters are per channel: the group's deployment channel has its own.
    assert t.open(command(11), "command", DEV, "other-channel", 65536)[1]
    restarted = device(setup)
    with pytest.raises(TrustError, match="replayed"):
        restarted.open(command(9), "command", DEV, CHANNEL, 65536)
    assert not restarted.open(first, "command", DEV, CHANNEL, 65536)[1]
    assert restarted.open(command(11), "command", DEV, CHANNEL, 65536)[1]


def test_operator_envelopes_open_in_order(setup: dict[str, Any]) -> None:
    """The fleet's Operator counters rise strictly, so each envelope it seals is new."""
    t = device(setup)
    op = operator()
    for i in range(3):
        env, new = t.open(
            op.command("dev1", {"id": f"c{i}", "op": "status"}), "command", DEV, CHANNEL, 65536
        )
        assert new
        t.commit(CHANNEL, env)


def test_unsigned_and_foreign_envelopes_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    t = device(setup)
    with pytest.raises(TrustError, match="unsigned message"):
        t.open(b'{"id": "x", "op": "rollback", "version": "1.0.0"}', "command", DEV, CHANNEL, 65536)
    from fleet.trust import Operator

    generate_keypair(tmp_path / "f", "foreign", force=True)
    foreign = Operator(tmp_path / "f" / "foreign.key")
    with pytest.raises(TrustError, match=f"key {foreign.key_id} is not an operator key"):
        t.open(foreign.command("dev1", {"id": "x", "op": "status"}), "command", DEV, CHANNEL, 65536)
    release = Operator(setup["release"].private)
    with pytest.raises(TrustError, match="is a release key, not an operator key"):
        t.open(release.command("dev1", {"id": "x", "op": "status"}), "command", DEV, CHANNEL, 65536)


# ------------------------------------------------------------------------------ lines


def manifest(name: str, version: str, security_floor: str | None = None) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        profile="test-cpu",
        runtime="onnxruntime",
        precision="fp32",
        task="classification",
        created="2026-01-01T00:00:00Z",
        builder_version="test",
        model=ModelInfo(
            file="model.onnx",
            inputs=[TensorSpec(name="x", dtype="float32", shape=[1])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=[1])],
        ),
        files={},
        metrics={},
        recipe=Recipe(name="test", steps=[]),
        golden=Golden(file="golden.npz", count=1, atol=1e-4, rtol=1e-4),
        security_floor=security_floor,
    )


def test_lines_highest_version_and_floor_persist(tmp_path: Path) -> None:
    lines = Lines(tmp_path)
    assert lines.install_problem(manifest("tiny", "1.0.0")) is None
    lines.record(manifest("tiny", "1.1.0"))
    lines.record(manifest("tinyb", "1.0.0"))  # another line does not move tiny's
    lines.record(manifest("tiny", "1.0.5"))  # a rollback to a kept version lowers nothing
    again = Lines(tmp_path)
    problem = again.install_problem(manifest("tiny", "1.0.0"))
    assert problem is not None
    assert "tiny 1.0.0 is older than 1.1.0, activated on this device before" in problem
    assert again.install_problem(manifest("tiny", "1.1.0")) is None  # the same version again
    assert again.install_problem(manifest("tinyb", "1.0.0")) is None
    assert again.run_problem(manifest("tiny", "1.0.0")) is None  # no floor: may run (rollback)


def test_security_floor_rises_never_falls_and_persists(tmp_path: Path) -> None:
    lines = Lines(tmp_path)
    lines.record(manifest("tiny", "1.2.0", security_floor="1.1.0"))
    assert lines.floor("tiny") == "1.1.0"
    lines.record(manifest("tiny", "1.3.0", security_floor="1.0.0"))  # a lower floor is ignored
    again = Lines(tmp_path)
    assert again.floor("tiny") == "1.1.0"
    assert (
        again.run_problem(manifest("tiny", "1.0.9"))
        == "tiny 1.0.9 is below the security floor 1.1.0"
    )
    assert again.run_problem(manifest("tiny", "1.1")) is None  # 1.1 == 1.1.0
    assert again.floor("tinyb") is None


def test_damaged_lines_file_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "lines.json").write_text("not json")
    assert Lines(tmp_path).install_problem(manifest("tiny", "0.1.0")) is None
