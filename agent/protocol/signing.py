"""ed25519 keys and signatures over canonical manifest JSON.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so openssl can read them.
A key id is the first 16 hex digits of sha256(raw public key bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import ConfigError, IntegrityError, UsageError

SIG_ALG = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, name: str = "edgefleet", force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (0600) and NAME.pub into ``out_dir``; refuse to overwrite unless forced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} already exists (use --force to replace it)")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv_pem)
    pub_path.write_bytes(pub_pem)
    return priv_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: signing key not found (create one: edgefleet keys generate)") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEM ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: public key not found") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEM ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an ed25519 public key")
    return key


@dataclass(frozen=True)
class Signature:
    alg: str
    key_id: str
    sig: bytes

    def to_bytes(self) -> bytes:
        doc = {"alg": self.alg, "key_id": self.key_id, "sig": base64.b64encode(self.sig).decode()}
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        try:
            doc = json.loads(data)
            sig = Signature(str(doc["alg"]), str(doc["key_id"]), base64.b64decode(doc["sig"], validate=True))
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"manifest.sig is malformed ({type(exc).__name__})") from None
        if sig.alg != SIG_ALG:
            raise IntegrityError(f"manifest.sig uses unsupported algorithm '{sig.alg}'")
        return sig


def sign(message: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(SIG_ALG, key_id(key.public_key()), key.sign(message))


def verify(message: bytes, signature: Signature, trusted: list[Ed25519PublicKey]) -> str:
    """Return the key id that verifies ``message``; raise IntegrityError otherwise."""
    if not trusted:
        raise IntegrityError("no trusted public keys configured")
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(signature.key_id)
    if key is None:
        raise IntegrityError(f"signed by unknown key {signature.key_id}")
    try:
        key.verify(signature.sig, message)
    except InvalidSignature:
        raise IntegrityError(f"bad signature (key {signature.key_id}): manifest was modified") from None
    return signature.key_id
