"""The operator's side of trust: the root-signed trust document and signed envelopes.

The trust document (agent.protocol.trust) lives in a file (keys/trust.json) that only the root
key changes: ``init_root`` writes the first one, ``add_key``/``revoke``/``retire``/``rotate_root``
/``renew`` each write the next version, and ``publish`` puts it retained on edgefleet/v1/trust,
where every device takes it if it is newer and signed by a root key it trusts.

``Operator`` seals deployments and commands with an operator key: target, issue time, expiry and
a counter (microseconds since the epoch, strictly increasing in one process), so a device can
refuse anything unsigned, foreign, stale, replayed or meant for another device.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, UsageError
from agent.protocol.signing import (
    TrustedKey,
    generate_keypair,
    key_id,
    load_private_key,
    read_trusted_key,
)
from agent.protocol.trust import (
    Target,
    TrustDocument,
    TrustError,
    TrustSigned,
    decode_trust,
    format_time,
    public_b64,
    sign_signed,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.broker import BrokerConfig

DAY = 86_400.0
TRUST_DAYS = 365.0  # how long a trust document is valid (renew before: edgefleet keys renew)
KEY_DAYS = 730.0  # how long a release or operator key is valid
DEPLOYMENT_TTL_S = 90 * DAY  # a retained desired state stays actionable this long
COMMAND_TTL_S = 600.0  # a command is stale after 10 minutes
OPERATOR_KEY_ENV = "EDGEFLEET_OPERATOR_KEY"


# ------------------------------------------------------------------------------ trust document


def load_document(path: Path) -> TrustDocument:
    try:
        return decode_trust(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no trust document (create one: edgefleet keys init-root)"
        ) from None
    except TrustError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Old or new document, never half of one (a crash while signing)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write(
    path: Path, signed: dict[str, Any], keys: list[Ed25519PrivateKey], rotation: bool = False
) -> TrustDocument:
    """Sign ``signed`` and write the document, carrying on the root rotation chain of the
    document it replaces (with ``rotation``, this one joins the chain: it changes the root)."""
    chain: list[dict[str, Any]] = []
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(path.read_bytes())
            chain = list(old.get("chain") or []) if isinstance(old, dict) else []
    doc: dict[str, Any] = {"signed": signed, "signatures": sign_signed(signed, keys)}
    if rotation:
        chain = [*chain, {"signed": signed, "signatures": doc["signatures"]}][-16:]
    if chain:
        doc["chain"] = chain
    payload = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    _atomic_write(path, payload)
    return decode_trust(payload)


def _next(doc: TrustSigned, root: Ed25519PrivateKey, days: float, **changes: Any) -> dict[str, Any]:
    if key_id(root.public_key()) not in doc.root_keys:
        raise UsageError(
            f"the root key given ({key_id(root.public_key())}) is not a root key of trust "
            f"document v{doc.version} ({', '.join(doc.root_keys)})"
        )
    now = time.time()
    signed = doc.model_dump(mode="json")
    signed.update(
        version=doc.version + 1,
        issued=format_time(now),
        expires=format_time(now + days * DAY),
        **changes,
    )
    return signed


def _entry(pub: TrustedKey, role: str, days: float, name: str) -> dict[str, Any]:
    return {
        "public": public_b64(pub),
        "role": role,
        "expires": format_time(time.time() + days * DAY),
        "name": name,
    }


@dataclass(frozen=True)
class RootSetup:
    root_key: Path
    root_pub: Path
    trust: Path
    release_key: Path | None
    operator_key: Path | None


def new_document(
    trust: Path,
    root_key: Path,
    roles: dict[str, list[Path]],
    version: int = 1,
) -> TrustDocument:
    """Write a first trust document: the root of ``root_key`` (its .pub beside it) and the public
    keys of each role (named after their files); it starts a new rotation chain."""
    root = load_private_key(root_key)
    rpub = read_trusted_key(root_key.with_suffix(".pub"))
    keys: dict[str, Any] = {}
    for role, pubs in roles.items():
        for pub in pubs:
            tk = read_trusted_key(pub)
            keys[tk.key_id] = _entry(tk, role, KEY_DAYS, pub.stem)
    now = time.time()
    signed = {
        "type": "edgefleet-trust",
        "version": version,
        "issued": format_time(now),
        "expires": format_time(now + TRUST_DAYS * DAY),
        "root_keys": {rpub.key_id: public_b64(rpub)},
        "keys": keys,
        "revoked": [],
    }
    trust.unlink(missing_ok=True)  # a new root of trust starts a new chain
    return _write(trust, signed, [root])


def init_root(out_dir: Path, force: bool = False, role_keys: bool = True) -> RootSetup:
    """A root key pair and trust document v1; with ``role_keys`` also a release and an operator
    key pair, listed in it (the usual start; keep root.key offline afterwards)."""
    trust = out_dir / "trust.json"
    if trust.exists() and not force:
        raise UsageError(f"{trust} already exists (use --force to start a new root of trust)")
    root_priv, root_pub = generate_keypair(out_dir, "root", force)
    made: dict[str, tuple[Path, Path]] = {}
    if role_keys:
        for role in ("release", "operator"):
            made[role] = generate_keypair(out_dir, role, force)
    new_document(trust, root_priv, {role: [pub] for role, (_, pub) in made.items()})
    release, operator = made.get("release"), made.get("operator")
    return RootSetup(
        root_priv,
        root_pub,
        trust,
        release[0] if release else None,
        operator[0] if operator else None,
    )


def provision(out_dir: Path, release_pubs: list[Path], force: bool = True) -> RootSetup:
    """A root and an operator key and a trust document listing them with existing release keys
    (the demo and the tests: their artifacts are signed by keys made elsewhere)."""
    setup = init_root(out_dir, force=force, role_keys=False)
    op_priv, op_pub = generate_keypair(out_dir, "operator", force)
    new_document(
        setup.trust, setup.root_key, {"release": release_pubs, "operator": [op_pub]}, version=2
    )
    return RootSetup(setup.root_key, setup.root_pub, setup.trust, None, op_priv)


def add_key(
    trust: Path, root_key: Path, pub: Path, role: str, days: float = KEY_DAYS, name: str = ""
) -> TrustDocument:
    doc = load_document(trust).signed
    tk = read_trusted_key(pub)
    if tk.key_id in doc.revoked:
        raise UsageError(f"key {tk.key_id} was revoked; a revoked key cannot come back")
    keys = doc.model_dump(mode="json")["keys"]
    keys[tk.key_id] = _entry(tk, role, days, name or pub.stem)
    return _write(
        trust,
        _next(doc, load_private_key(root_key), TRUST_DAYS, keys=keys),
        [load_private_key(root_key)],
    )


def _find(doc: TrustSigned, which: str) -> str:
    """A key id from a key id, a unique prefix, a key name, or a .pub file."""
    if os.path.isfile(which):
        return read_trusted_key(Path(which)).key_id
    hits = [k for k, e in doc.keys.items() if k.startswith(which) or e.name == which]
    if len(hits) != 1:
        known = ", ".join(f"{k} ({e.role} {e.name})" for k, e in doc.keys.items()) or "none"
        raise UsageError(
            f"'{which}' {'matches several keys' if hits else 'is not a key'} in trust document "
            f"v{doc.version} (keys: {known})"
        )
    return hits[0]


def revoke(trust: Path, root_key: Path, which: str) -> tuple[TrustDocument, str]:
    """Revoke a compromised key: devices refuse what it signs and stop serving artifacts signed
    by it (falling back to a kept version that is still trusted)."""
    doc = load_document(trust).signed
    kid = _find(doc, which)
    keys = {k: v for k, v in doc.model_dump(mode="json")["keys"].items() if k != kid}
    root = load_private_key(root_key)
    signed = _next(doc, root, TRUST_DAYS, keys=keys, revoked=[*doc.revoked, kid])
    return _write(trust, signed, [root]), kid


def retire(trust: Path, root_key: Path, which: str) -> tuple[TrustDocument, str]:
    """Retire a key that was not compromised (rotation): it expires now, so it signs nothing new,
    but artifacts it signed keep serving and can still be rolled back to."""
    doc = load_document(trust).signed
    kid = _find(doc, which)
    keys = doc.model_dump(mode="json")["keys"]
    keys[kid]["expires"] = format_time(time.time())
    root = load_private_key(root_key)
    return _write(trust, _next(doc, root, TRUST_DAYS, keys=keys), [root]), kid


def rotate(
    trust: Path, root_key: Path, role: str, out_dir: Path, name: str, force: bool = False
) -> tuple[TrustDocument, Path, list[str]]:
    """A new key for ``role`` (release or operator) is added and the role's other keys retired."""
    doc = load_document(trust).signed
    old = [k for k, e in doc.keys.items() if e.role == role and k not in doc.revoked]
    priv, pub = generate_keypair(out_dir, name, force)
    tk = read_trusted_key(pub)
    keys = doc.model_dump(mode="json")["keys"]
    now = format_time(time.time())
    for k in old:
        keys[k]["expires"] = min(keys[k]["expires"], now)
    keys[tk.key_id] = _entry(tk, role, KEY_DAYS, name)
    root = load_private_key(root_key)
    return _write(trust, _next(doc, root, TRUST_DAYS, keys=keys), [root]), priv, old


def rotate_root(
    trust: Path, root_key: Path, out_dir: Path, name: str = "root-next", force: bool = False
) -> tuple[TrustDocument, Path, Path]:
    """A new root key replaces the old one; the document is signed by both (TUF), so devices
    holding the old document take it, and from then on trust only the new root."""
    doc = load_document(trust).signed
    old_root = load_private_key(root_key)
    priv, pub = generate_keypair(out_dir, name, force)
    new_root = load_private_key(priv)
    tk = read_trusted_key(pub)
    signed = _next(doc, old_root, TRUST_DAYS, root_keys={tk.key_id: public_b64(tk)})
    return _write(trust, signed, [old_root, new_root], rotation=True), priv, pub


def renew(trust: Path, root_key: Path, days: float = TRUST_DAYS) -> TrustDocument:
    """The same keys under a new version and expiry (a trust document expires: renew it)."""
    doc = load_document(trust).signed
    root = load_private_key(root_key)
    return _write(trust, _next(doc, root, days), [root])


def publish(broker: BrokerConfig, trust: Path) -> TrustDocument:
    """Put the trust document retained on edgefleet/v1/trust and read it back."""
    from agent.errors import BrokerError
    from agent.protocol import topics
    from fleet.mqtt import connected

    doc = load_document(trust)
    payload = trust.read_bytes()
    with connected(broker, "edgefleet-keys") as c:
        c.publish(topics.trust(), payload, retain=True)
        c.flush()
        if c.retained_one(topics.trust(), limit=10.0) != payload:
            raise BrokerError(
                f"{broker.url}: the broker acknowledged the trust document but does not hold it"
            )
    return doc


# ------------------------------------------------------------------------------ envelopes


class Operator:
    """Signs deployments and commands with one operator key."""

    _last_counter = 0  # per process: two envelopes never share a counter

    def __init__(self, key_path: Path) -> None:
        self.path = key_path
        self.key = load_private_key(key_path)
        self.key_id = key_id(self.key.public_key())

    @classmethod
    def _counter(cls) -> int:
        cls._last_counter = max(time.time_ns() // 1000, cls._last_counter + 1)
        return cls._last_counter

    def seal(self, kind: str, target: Target, body: dict[str, Any], ttl_s: float) -> bytes:
        now = time.time()
        signed = {
            "type": kind,
            "target": target.model_dump(mode="json", exclude_none=True),
            "issued": format_time(now),
            "expires": format_time(now + ttl_s),
            "counter": self._counter(),
            "body": body,
        }
        env = {"signed": signed, "signatures": sign_signed(signed, [self.key])}
        return json.dumps(env, separators=(",", ":")).encode()

    def deployment(
        self, target: Target, body: dict[str, Any], ttl_s: float = DEPLOYMENT_TTL_S
    ) -> bytes:
        return self.seal("deployment", target, body, ttl_s)

    def command(self, device: str, body: dict[str, Any], ttl_s: float = COMMAND_TTL_S) -> bytes:
        return self.seal("command", Target(device=device), body, ttl_s)


def operator(path: Path | str | None) -> Operator:
    """The operator signer from ``--operator-key`` or $EDGEFLEET_OPERATOR_KEY."""
    given = path or os.environ.get(OPERATOR_KEY_ENV)
    if not given:
        raise UsageError(
            f"deployments and commands are signed: give --operator-key KEY or set "
            f"${OPERATOR_KEY_ENV} (create one: edgefleet keys init-root)"
        )
    return Operator(Path(given))
