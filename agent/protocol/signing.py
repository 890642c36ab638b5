"""ed25519 keys and signatures over canonical manifest JSON.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) so openssl can read them.
A key id is the first 16 hex digits of sha256(raw public key bytes).

cryptography is imported only where a key is made, loaded or used (about 8 MB resident: its
Rust extension and OpenSSL). The agent holds its trusted keys as ``TrustedKey`` (the raw bytes,
read from the PEM without cryptography), so an idle agent that has verified nothing since it
started never loads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError, IntegrityError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIG_ALG = "ed25519"
# DER SubjectPublicKeyInfo of an ed25519 key (RFC 8410 section 4): this fixed prefix (SEQUENCE,
# AlgorithmIdentifier with OID 1.3.101.112 and no parameters, BIT STRING) then the 32 key bytes.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC_RE = re.compile(rb"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", re.S)


@dataclass(frozen=True)
class TrustedKey:
    """A trusted ed25519 public key as raw bytes; cryptography loads only when it verifies."""

    raw: bytes
    key_id: str

    @classmethod
    def from_raw(cls, raw: bytes) -> TrustedKey:
        return cls(raw, hashlib.sha256(raw).hexdigest()[:16])

    def verify(self, sig: bytes, message: bytes) -> None:
        """Raise cryptography's InvalidSignature unless ``sig`` signs ``message``."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        Ed25519PublicKey.from_public_bytes(self.raw).verify(sig, message)


def key_id(public_key: Ed25519PublicKey | TrustedKey) -> str:
    if isinstance(public_key, TrustedKey):
        return public_key.key_id
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return TrustedKey.from_raw(raw).key_id


def read_trusted_key(path: Path) -> TrustedKey:
    """A PEM ed25519 public key (SubjectPublicKeyInfo), read without importing cryptography."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: public key not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the public key ({exc.strerror or exc})") from None
    m = _PEM_PUBLIC_RE.search(pem)
    if m is None:
        raise ConfigError(f"{path}: not a PEM ed25519 public key (no BEGIN PUBLIC KEY block)")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path}: not a PEM ed25519 public key (bad base64)") from None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise ConfigError(f"{path}: not an ed25519 public key")
    return TrustedKey.from_raw(der[len(_ED25519_SPKI_PREFIX) :])


def generate_keypair(
    out_dir: Path, name: str = "edgefleet", force: bool = False
) -> tuple[Path, Path]:
    """Write NAME.key (0600) and NAME.pub into ``out_dir``; refuse to overwrite unless forced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path} already exists (use --force to replace it)")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: signing key not found (create one: edgefleet keys generate)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a PEM ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

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
            sig = Signature(
                str(doc["alg"]), str(doc["key_id"]), base64.b64decode(doc["sig"], validate=True)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"manifest.sig is malformed ({type(exc).__name__})") from None
        if sig.alg != SIG_ALG:
            raise IntegrityError(f"manifest.sig uses unsupported algorithm '{sig.alg}'")
        return sig


def sign(message: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(SIG_ALG, key_id(key.public_key()), key.sign(message))


def verify(
    message: bytes, signature: Signature, trusted: Sequence[Ed25519PublicKey | TrustedKey]
) -> str:
    """Return the key id that verifies ``message``; raise IntegrityError otherwise."""
    if not trusted:
        raise IntegrityError("no trusted public keys configured")
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(signature.key_id)
    if key is None:
        raise IntegrityError(f"signed by unknown key {signature.key_id}")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature.sig, message)
    except InvalidSignature:
        raise IntegrityError(
            f"bad signature (key {signature.key_id}): manifest was modified"
        ) from None
    return signature.key_id
