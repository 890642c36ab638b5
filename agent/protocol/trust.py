"""Trust as data (TUF/Uptane roles): the root-signed trust document and signed envelopes.

Three roles. The **root** key (kept offline) signs the trust document, which lists the
**release** keys (they sign artifacts) and the **operator** keys (they sign deployments and
commands), each with an expiry, under a version number; devices pin only the root key. A
deployment or a command is an **envelope**: the body plus its target (one device or one group),
an issue time, an expiry and a counter, signed by an operator key. Everything here is pure
(no files, no clock of its own): ``agent.deploy.trust`` keeps the device's state.

Times are UTC ISO 8601 strings ending in ``Z``; signatures are ed25519 over the canonical JSON
of ``signed`` (see canonical.py), so the bytes signed never depend on how a message was written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from agent.errors import IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.signing import SIG_ALG, TrustedKey
from agent.protocol.topics import SEGMENT_RE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TRUST_TYPE = "edgefleet-trust"
Role = Literal["release", "operator"]
ROLES: tuple[str, ...] = ("release", "operator")
EnvelopeType = Literal["deployment", "command"]
# An envelope issued this far in the future is refused (clock skew between operator and device).
MAX_CLOCK_SKEW_S = 300.0
MAX_TRUST_BYTES = 256 * 1024


class TrustError(IntegrityError):
    """A trust document or an envelope that is refused; the text is the reason sent in an event."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_time(value: str) -> float:
    """Seconds since the epoch for a UTC ISO 8601 time ('2026-12-02T10:00:00Z')."""
    try:
        dt = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone (end it with Z)")
    return dt.timestamp()


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def _time(v: str) -> str:
    parse_time(v)
    return v


def _public(v: str) -> str:
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public key is not base64") from None
    if len(raw) != 32:
        raise ValueError("public key is not 32 bytes (raw ed25519)")
    return v


def public_b64(key: TrustedKey) -> str:
    return base64.b64encode(key.raw).decode()


def trusted_key(b64: str) -> TrustedKey:
    return TrustedKey.from_raw(base64.b64decode(b64))


class SignatureEntry(_Strict):
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    sig: str
    alg: Literal["ed25519"] = "ed25519"


class KeyEntry(_Strict):
    """A release or operator key in the trust document."""

    public: str
    role: Role
    expires: str
    name: str = Field(default="", max_length=128)

    _p = field_validator("public")(_public)
    _e = field_validator("expires")(_time)


class TrustSigned(_Strict):
    type: Literal["edgefleet-trust"] = "edgefleet-trust"
    version: int = Field(ge=1)
    issued: str
    expires: str
    # Keys that may sign the next trust document (key id -> base64 raw public key).
    root_keys: dict[str, str] = Field(min_length=1, max_length=8)
    keys: dict[str, KeyEntry] = Field(max_length=256)
    revoked: list[str] = Field(default=[], max_length=4096)

    _t = field_validator("issued", "expires")(_time)

    @field_validator("root_keys")
    @classmethod
    def _roots(cls, v: dict[str, str]) -> dict[str, str]:
        for kid, pub in v.items():
            if trusted_key(_public(pub)).key_id != kid:
                raise ValueError(f"root key id {kid} does not match its public key")
        return v

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: dict[str, KeyEntry]) -> dict[str, KeyEntry]:
        for kid, entry in v.items():
            if trusted_key(entry.public).key_id != kid:
                raise ValueError(f"key id {kid} does not match its public key")
        return v

    def key_problem(self, kid: str, role: str, now: float) -> str | None:
        """Why key ``kid`` may not act as ``role`` at ``now``, or None when it may."""
        if kid in self.revoked:
            return f"key {kid} is revoked (trust document v{self.version})"
        entry = self.keys.get(kid)
        if entry is None:
            return f"key {kid} is not {_a(role)} key in trust document v{self.version}"
        if entry.role != role:
            return f"key {kid} is {_a(entry.role)} key, not {_a(role)} key"
        if parse_time(entry.expires) <= now:
            return f"{role} key {kid} expired at {entry.expires}"
        return None

    def role_keys(self, role: str, now: float) -> list[TrustedKey]:
        return [
            trusted_key(e.public)
            for kid, e in self.keys.items()
            if self.key_problem(kid, role, now) is None
        ]

    def roots(self) -> list[TrustedKey]:
        return [trusted_key(p) for p in self.root_keys.values()]


class _SignedDoc(_Strict):
    """A ``signed`` part and its signatures. Signatures cover the canonical JSON of ``signed``
    exactly as received (kept in ``raw``), never a re-encoding by this version's models."""

    signatures: list[SignatureEntry] = Field(min_length=1, max_length=8)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def message(self) -> bytes:
        return canonical_json(self._raw)


class TrustDocument(_SignedDoc):
    """Retained on edgefleet/v1/trust; also the file a device is provisioned with.

    ``chain`` carries the documents that rotated the root key (each a whole document, signed by
    the old and the new root), oldest first, so a device that missed a rotation can still walk
    from the root it trusts to this document (TUF's root chain). It is not part of ``signed``:
    each link proves itself.
    """

    signed: TrustSigned
    chain: list[dict[str, Any]] = Field(default=[], max_length=16)


class Target(_Strict):
    """Exactly one of a device id or a group name."""

    device: str | None = None
    group: str | None = None

    @field_validator("device", "group")
    @classmethod
    def _seg(cls, v: str | None) -> str | None:
        if v is not None and not SEGMENT_RE.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (max 64)")
        return v

    def label(self) -> str:
        return f"device {self.device}" if self.device is not None else f"group {self.group}"


class EnvelopeSigned(_Strict):
    type: EnvelopeType
    target: Target
    issued: str
    expires: str
    counter: int = Field(ge=1, le=2**63 - 1)
    body: dict[str, Any]

    _t = field_validator("issued", "expires")(_time)


class Envelope(_SignedDoc):
    """A signed deployment or command: what a device acts on."""

    signed: EnvelopeSigned

    def digest(self) -> str:
        """sha256 of the signed part: the same message redelivered has the same digest."""
        return hashlib.sha256(self.message).hexdigest()


# ------------------------------------------------------------------------------ signing


def sign_signed(
    signed: Mapping[str, Any], keys: Iterable[Ed25519PrivateKey]
) -> list[dict[str, str]]:
    from agent.protocol.signing import key_id

    message = canonical_json(dict(signed))
    return [
        {
            "key_id": key_id(k.public_key()),
            "sig": base64.b64encode(k.sign(message)).decode(),
            "alg": SIG_ALG,
        }
        for k in keys
    ]


def verified_by(doc: _SignedDoc, keys: Iterable[TrustedKey]) -> set[str]:
    """Key ids among ``keys`` with a valid signature over ``doc``'s signed part."""
    from cryptography.exceptions import InvalidSignature

    by_id = {k.key_id: k for k in keys}
    message = doc.message
    ok: set[str] = set()
    for s in doc.signatures:
        key = by_id.get(s.key_id)
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(s.sig, validate=True), message)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        ok.add(s.key_id)
    return ok


def _load_json(payload: bytes, max_bytes: int, what: str) -> Any:
    if len(payload) > max_bytes:
        raise TrustError(f"{what} of {len(payload)} bytes exceeds the {max_bytes} allowed")
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TrustError(f"{what} is not UTF-8 JSON") from None


def _validate(model: type[_SignedDoc], doc: Any, what: str) -> Any:
    try:
        result = model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise TrustError(f"{what}: {loc}: {msg}") from None
    try:
        # json.loads takes NaN, Infinity and 1e400; canonical JSON cannot encode them, so no
        # signature can cover them: refused here, not a ValueError when a signature is checked.
        canonical_json(doc["signed"])
    except ValueError:
        raise TrustError(
            f"{what}: signed: holds values that cannot be signed (non-finite numbers)"
        ) from None
    result._raw = doc["signed"]
    return result


def decode_trust(payload: bytes) -> TrustDocument:
    doc = _load_json(payload, MAX_TRUST_BYTES, "trust document")
    result: TrustDocument = _validate(TrustDocument, doc, "trust document")
    return result


def chain_links(doc: TrustDocument) -> list[TrustDocument]:
    """The root rotation documents ``doc`` carries (malformed links are left out)."""
    links = []
    for i, link in enumerate(doc.chain):
        try:
            links.append(_validate(TrustDocument, link, f"trust document chain.{i}"))
        except TrustError:
            continue
    return links


def decode_envelope(payload: bytes, max_bytes: int) -> Envelope:
    doc = _load_json(payload, max_bytes, "envelope")
    if isinstance(doc, dict) and "signed" not in doc:
        raise TrustError("unsigned message (deployments and commands must be signed envelopes)")
    result: Envelope = _validate(Envelope, doc, "envelope")
    return result


def check_successor(
    current: TrustSigned | None,
    pinned: list[TrustedKey],
    new: TrustDocument,
    now: float,
    check_expiry: bool = True,
) -> None:
    """Raise TrustError unless ``new`` may replace ``current`` (TUF's root update rules).

    Signed by a root key of the current document (or the pinned root key, before any); a
    document that changes the root keys is signed by one of its own root keys too; its version
    is newer; it has not expired.
    """
    s = new.signed
    # Once a document is held its root keys decide; the pinned key only bootstraps (a rotated-out
    # root key, however it leaked, can no longer sign anything a device takes).
    trusted_roots = current.roots() if current is not None else pinned
    if not verified_by(new, trusted_roots):
        raise TrustError(f"trust document v{s.version} is not signed by a trusted root key")
    if (
        current is not None
        and set(s.root_keys) != set(current.root_keys)
        and not verified_by(new, s.roots())
    ):
        raise TrustError(
            f"trust document v{s.version} changes the root keys but is not signed by the new ones"
        )
    if current is not None and s.version <= current.version:
        raise TrustError(
            f"trust document v{s.version} is not newer than the one held (v{current.version})"
        )
    if check_expiry and parse_time(s.expires) <= now:
        raise TrustError(f"trust document v{s.version} expired at {s.expires}")


def check_envelope(
    env: Envelope, trust: TrustSigned, kind: str, target: Target, now: float
) -> None:
    """Raise TrustError unless ``env`` is a ``kind`` for ``target``, signed by a valid operator
    key, issued (within the clock skew) and not expired. Counters are the caller's."""
    s = env.signed
    if s.type != kind:
        raise TrustError(f"a signed {s.type} where a {kind} was expected")
    if s.target != target:
        raise TrustError(f"{kind} is for {s.target.label()}, not {target.label()}")
    problems = []
    for sig in env.signatures:
        problem = trust.key_problem(sig.key_id, "operator", now)
        if problem is None:
            break
        problems.append(problem)
    else:
        raise TrustError(f"{kind} refused: {'; '.join(problems)}")
    if not verified_by(env, trust.role_keys("operator", now)):
        raise TrustError(f"{kind} has a bad signature (modified after signing)")
    if parse_time(s.issued) > now + MAX_CLOCK_SKEW_S:
        raise TrustError(f"{kind} is issued in the future ({s.issued}; check the clocks)")
    if parse_time(s.expires) <= now:
        raise TrustError(f"{kind} expired at {s.expires}")
