"""TrustedKey: the agent's trusted keys read without cryptography, which loads only to verify."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError, IntegrityError
from agent.protocol.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    read_trusted_key,
    sign,
    verify,
)
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def test_same_key_and_id_as_cryptography(keys: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    pub = load_public_key(keys[1])
    tk = read_trusted_key(keys[1])
    assert tk.raw == pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(tk) == tk.key_id == key_id(pub)


def test_verifies_a_real_signature_and_refuses_a_changed_message(keys: tuple[Path, Path]) -> None:
    sig = sign(b"manifest bytes", load_private_key(keys[0]))
    tk = read_trusted_key(keys[1])
    assert verify(b"manifest bytes", sig, [tk]) == tk.key_id
    with pytest.raises(IntegrityError, match="bad signature"):
        verify(b"manifest bytez", sig, [tk])


def test_other_pem_files_are_refused_with_one_line(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pub = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    good = keys[1].read_bytes()
    cases = {
        "ec.pub": (ec_pub, "not an ed25519 public key"),
        "private.pub": (keys[0].read_bytes(), "no BEGIN PUBLIC KEY block"),
        "base64.pub": (good.replace(b"MCow", b"M*ow"), "bad base64"),
        "short.pub": (
            b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
            "not an ed25519 public key",
        ),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=msg) as exc:
            read_trusted_key(tmp_path / name)
        assert "\n" not in str(exc.value) and name in str(exc.value)
    with pytest.raises(ConfigError, match="public key not found"):
        read_trusted_key(tmp_path / "missing.pub")
    # what cryptography accepts in the ordinary layout is accepted: CRLF line ends, text around
    (tmp_path / "crlf.pub").write_bytes(b"comment\r\n" + good.replace(b"\n", b"\r\n"))
    assert read_trusted_key(tmp_path / "crlf.pub") == read_trusted_key(keys[1])


def test_agent_start_imports_no_cryptography_until_it_verifies(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """What the running agent imports at start (its RSS counts it); cryptography comes on first use."""
    from tests.agent_helpers import trust_for, trust_root

    trust = trust_for([keys[1]], tmp_path / "trust")
    code = f"""
import sys
from pathlib import Path
import agent.cli, agent.deploy.agent, agent.serve.http, agent.transport.mqtt
from agent.config import load_config
from agent.deploy.policy import resolve_policy
cfg = Path(sys.argv[1]); cfg.write_text('device_id = "d"\\nprofile = "p"\\nstate_dir = "{tmp_path}/s"\\n'
    'root_key = "{trust_root() / "root.pub"}"\\ntrust_file = "{trust}"\\n[install]\\nmax_p95_ms = 10.0\\n')
policy = resolve_policy(load_config(cfg))
assert "cryptography" not in sys.modules, "imported at start"
from agent.protocol.signing import Signature, verify
try:
    verify(b"m", Signature("ed25519", policy.keys[0].key_id, bytes(64)), list(policy.keys))
except Exception as exc:
    print(type(exc).__name__)
assert "cryptography" in sys.modules
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "agent.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "IntegrityError"
