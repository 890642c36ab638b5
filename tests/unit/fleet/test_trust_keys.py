"""`edgefleet keys` end to end: every command writes the next trust document version, a device
(DeviceTrust pinned to the new root.pub) takes each in turn, and mistakes are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.clikit import main
from agent.deploy.trust import DeviceTrust
from agent.protocol.signing import generate_keypair, read_trusted_key
from agent.protocol.trust import TrustError


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    rc = main(["keys", *args, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(["keys", *args])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def keys_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "keys"
    doc = run(capsys, "init-root", "--out", str(d))
    assert doc["version"] == 1 and doc["published"] is None
    assert sorted(e["role"] for e in doc["keys"].values()) == ["operator", "release"]
    for name in ("root", "release", "operator"):
        assert (d / f"{name}.key").is_file() and (d / f"{name}.pub").is_file()
    return d


def device(keys_dir: Path, state: Path) -> DeviceTrust:
    state.mkdir(exist_ok=True)
    return DeviceTrust(state, [read_trusted_key(keys_dir / "root.pub")], keys_dir / "trust.json")


def test_every_command_writes_a_version_the_device_takes(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust, root = str(keys_dir / "trust.json"), str(keys_dir / "root.key")
    common = ("--trust", trust, "--root-key", root)
    dev = device(keys_dir, tmp_path / "state")
    assert dev.version == 1

    def take(expected: int) -> None:
        assert dev.update((keys_dir / "trust.json").read_bytes()) is True
        assert dev.version == expected

    _, pub = generate_keypair(tmp_path / "new", "ops2")
    doc = run(capsys, "add", str(pub), "--role", "operator", "--days", "30", *common)
    kid = read_trusted_key(pub).key_id
    assert doc["version"] == 2 and doc["keys"][kid] == {
        "role": "operator",
        "name": "ops2",
        "expires": doc["keys"][kid]["expires"],
    }
    take(2)

    doc = run(capsys, "revoke", "ops2", *common)
    assert doc["version"] == 3 and doc["revoked_key"] == kid and doc["revoked"] == [kid]
    assert kid not in doc["keys"]
    take(3)
    err = fails(capsys, "add", str(pub), "--role", "operator", *common)
    assert "was revoked; a revoked key cannot come back" in err

    old_release = read_trusted_key(keys_dir / "release.pub").key_id
    doc = run(
        capsys, "rotate", "--role", "release", "--out", str(keys_dir), "--name", "rel2", *common
    )
    assert doc["version"] == 4 and doc["retired"] == [old_release]
    new_release = read_trusted_key(keys_dir / "rel2.pub").key_id
    take(4)
    # The retired key signs nothing new, but what it signed keeps serving.
    assert [k.key_id for k in dev.release_keys()] == [new_release]
    assert dev.revoked(old_release) is None

    doc = run(
        capsys, "rotate", "--role", "operator", "--out", str(keys_dir), "--name", "op2", *common
    )
    assert doc["version"] == 5
    take(5)
    assert dev.key_problem(read_trusted_key(keys_dir / "operator.pub").key_id, "operator")

    doc = run(
        capsys, "rotate", "--role", "root", "--out", str(keys_dir), "--name", "root2", *common
    )
    new_root = read_trusted_key(keys_dir / "root2.pub").key_id
    assert doc["version"] == 6 and doc["root_keys"] == [new_root]
    take(6)
    # The old root is out: the CLI refuses it, and a document it signs is refused by the device.
    err = fails(capsys, "renew", *common)
    assert "is not a root key of trust document v6" in err
    doc = run(
        capsys, "renew", "--days", "30", "--trust", trust, "--root-key", str(keys_dir / "root2.key")
    )
    assert doc["version"] == 7
    take(7)

    shown = run(capsys, "show", "--trust", trust)
    assert shown["version"] == 7 and shown["root_keys"] == [new_root]
    assert shown["revoked"] == [kid]

    # A device provisioned with v1 and then restarted holds v7 from its state dir.
    assert device(keys_dir, tmp_path / "state").version == 7


def test_document_signed_by_a_rotated_out_root_is_refused(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    trust = keys_dir / "trust.json"
    dev = device(keys_dir, tmp_path / "state")
    assert dev.version == 1
    stale = tmp_path / "stale.json"
    shutil.copy(trust, stale)
    run(
        capsys,
        "rotate",
        "--role",
        "root",
        "--out",
        str(keys_dir),
        "--name",
        "root2",
        "--trust",
        str(trust),
        "--root-key",
        str(keys_dir / "root.key"),
    )
    dev.update(trust.read_bytes())
    # Whoever still has the old root key signs a "newer" document from an old copy.
    run(capsys, "renew", "--trust", str(stale), "--root-key", str(keys_dir / "root.key"))
    run(capsys, "renew", "--trust", str(stale), "--root-key", str(keys_dir / "root.key"))
    with pytest.raises(TrustError, match="v3 is not signed by a trusted root key"):
        dev.update(stale.read_bytes())
    assert dev.version == 2


def test_errors_are_one_line(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust, root = str(keys_dir / "trust.json"), str(keys_dir / "root.key")
    generate_keypair(tmp_path / "foreign", "root")
    err = fails(capsys, "renew", "--trust", trust, "--root-key", str(tmp_path / "foreign/root.key"))
    assert "is not a root key of trust document v1" in err
    err = fails(capsys, "revoke", "nope", "--trust", trust, "--root-key", root)
    assert "'nope' is not a key in trust document v1" in err
    err = fails(capsys, "show", "--trust", str(tmp_path / "missing.json"))
    assert "no trust document (create one: edgefleet keys init-root)" in err
    err = fails(capsys, "renew", "--trust", trust, "--root-key", str(tmp_path / "missing.key"))
    assert "missing.key" in err
    err = fails(capsys, "init-root", "--out", str(keys_dir))
    assert "already exists" in err
    (tmp_path / "junk.json").write_text('{"signed": 1}')
    err = fails(capsys, "show", "--trust", str(tmp_path / "junk.json"))
    assert "junk.json: trust document:" in err
    # Nothing was written by a refused command.
    assert run(capsys, "show", "--trust", trust)["version"] == 1


@pytest.mark.integration
def test_publish_to_a_real_broker(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.protocol import topics
    from fleet.mqtt import SyncClient, broker_config
    from tests.agent_helpers import Broker

    b = Broker(tmp_path / "broker")
    b.start()
    try:
        trust = str(keys_dir / "trust.json")
        doc = run(capsys, "publish", "--trust", trust, "--broker", b.url)
        assert doc["published"] == b.url and doc["version"] == 1
        doc = run(
            capsys,
            "renew",
            "--trust",
            trust,
            "--root-key",
            str(keys_dir / "root.key"),
            "--broker",
            b.url,
        )
        assert doc["version"] == 2 and doc["published"] == b.url
        with SyncClient(broker_config(b.url)) as c:
            held = c.retained_one(topics.trust(), limit=5.0)
        assert held == (keys_dir / "trust.json").read_bytes()
        dev = device(keys_dir, tmp_path / "state")
        assert held is not None and dev.version == 2  # v2 provisioned file; retained is the same
    finally:
        b.stop()
    # An unreachable broker is a one-line error naming it.
    rc = main(["keys", "publish", "--trust", trust, "--broker", b.url])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_device_that_missed_root_rotations_walks_the_chain(
    keys_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two root rotations and a renewal signed only by the newest root: a device still holding
    v1 takes the newest document through the rotation documents it carries (TUF's chain), and
    a link tampered with breaks the walk."""
    trust = keys_dir / "trust.json"
    dev = device(keys_dir, tmp_path / "state")
    assert dev.version == 1
    root = keys_dir / "root.key"
    for name in ("root2", "root3"):
        run(capsys, "rotate", "--role", "root", "--out", str(keys_dir), "--name", name,
            "--trust", str(trust), "--root-key", str(root))  # fmt: skip
        root = keys_dir / f"{name}.key"
    run(capsys, "renew", "--trust", str(trust), "--root-key", str(root))
    doc = json.loads(trust.read_bytes())
    assert doc["signed"]["version"] == 4 and len(doc["chain"]) == 2
    # without the chain v4 is signed by a root this device has never seen
    bare = json.dumps({k: v for k, v in doc.items() if k != "chain"}).encode()
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        dev.update(bare)
    tampered = json.loads(json.dumps(doc))
    tampered["chain"][0]["signed"]["expires"] = "2099-01-01T00:00:00Z"
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        dev.update(json.dumps(tampered).encode())
    assert dev.version == 1
    assert dev.update(trust.read_bytes()) is True and dev.version == 4
    assert dev.doc is not None and set(dev.doc.root_keys) == {
        read_trusted_key(keys_dir / "root3.pub").key_id
    }
    # a fresh root of trust (init-root --force) starts without the old chain
    run(capsys, "init-root", "--out", str(keys_dir), "--force")
    assert "chain" not in json.loads(trust.read_bytes())
