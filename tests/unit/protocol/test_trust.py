"""The trust document and envelopes (agent.protocol.trust): TUF's root update rules, key roles,
and every way a deployment or command envelope is refused, each with its reason."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol.messages import MessageError
from agent.protocol.signing import TrustedKey
from agent.protocol.trust import (
    MAX_CLOCK_SKEW_S,
    Target,
    TrustError,
    check_envelope,
    check_successor,
    decode_envelope,
    decode_trust,
    format_time,
    sign_signed,
)

NOW = time.time()
DAY = 86_400.0


def tk(k: Ed25519PrivateKey) -> TrustedKey:
    return TrustedKey.from_raw(
        k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def b64(k: Ed25519PrivateKey) -> str:
    return base64.b64encode(tk(k).raw).decode()


ROOT, ROOT2, RELEASE, OPERATOR, FOREIGN = (Ed25519PrivateKey.generate() for _ in range(5))


def signed_doc(
    version: int,
    roots: tuple[Ed25519PrivateKey, ...] = (ROOT,),
    keys: dict[Ed25519PrivateKey, tuple[str, float]] | None = None,
    revoked: tuple[Ed25519PrivateKey, ...] = (),
    expires: float = NOW + 365 * DAY,
) -> dict[str, Any]:
    keys = (
        keys
        if keys is not None
        else {RELEASE: ("release", NOW + DAY), OPERATOR: ("operator", NOW + DAY)}
    )
    return {
        "type": "edgefleet-trust",
        "version": version,
        "issued": format_time(NOW - 60),
        "expires": format_time(expires),
        "root_keys": {tk(r).key_id: b64(r) for r in roots},
        "keys": {
            tk(k).key_id: {
                "public": b64(k),
                "role": role,
                "expires": format_time(exp),
                "name": role,
            }
            for k, (role, exp) in keys.items()
        },
        "revoked": [tk(k).key_id for k in revoked],
    }


def sealed(signed: dict[str, Any], *signers: Ed25519PrivateKey) -> bytes:
    return json.dumps({"signed": signed, "signatures": sign_signed(signed, signers)}).encode()


def trust(version: int, *signers: Ed25519PrivateKey, **kw: Any) -> Any:
    return decode_trust(sealed(signed_doc(version, **kw), *(signers or (ROOT,))))


HELD = trust(2).signed
DEV = Target(device="dev1")


def envelope(
    kind: str = "command",
    target: dict[str, str] | None = None,
    signer: Ed25519PrivateKey = OPERATOR,
    issued: float = NOW - 1,
    expires: float = NOW + 600,
    counter: int = 7,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    signed = {
        "type": kind,
        "target": target or {"device": "dev1"},
        "issued": format_time(issued),
        "expires": format_time(expires),
        "counter": counter,
        "body": body if body is not None else {"id": "c1", "op": "status"},
    }
    return {"signed": signed, "signatures": sign_signed(signed, [signer])}


def check(env: dict[str, Any], kind: str = "command", target: Target = DEV) -> None:
    check_envelope(decode_envelope(json.dumps(env).encode(), 65536), HELD, kind, target, NOW)


# ------------------------------------------------------------------------------ trust document


def test_first_document_needs_the_pinned_root() -> None:
    check_successor(None, [tk(ROOT)], trust(1), NOW)
    with pytest.raises(TrustError, match="v1 is not signed by a trusted root key"):
        check_successor(None, [tk(ROOT)], trust(1, FOREIGN), NOW)


@pytest.mark.parametrize("version", [1, 2])
def test_older_or_equal_version_refused(version: int) -> None:
    with pytest.raises(TrustError, match=f"v{version} is not newer than the one held \\(v2\\)"):
        check_successor(HELD, [tk(ROOT)], trust(version), NOW)
    check_successor(HELD, [tk(ROOT)], trust(3), NOW)


def test_foreign_signed_and_unsigned_refused() -> None:
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        check_successor(HELD, [tk(ROOT)], trust(3, FOREIGN), NOW)
    with pytest.raises(TrustError, match="signatures"):
        decode_trust(json.dumps({"signed": signed_doc(3), "signatures": []}).encode())
    with pytest.raises(TrustError, match="signatures: Field required"):
        decode_trust(json.dumps({"signed": signed_doc(3)}).encode())
    # A signature by the right key id over other bytes is no signature.
    doc = json.loads(sealed(signed_doc(3), ROOT))
    doc["signed"]["revoked"] = [tk(RELEASE).key_id]
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        check_successor(HELD, [tk(ROOT)], decode_trust(json.dumps(doc).encode()), NOW)


def test_expired_document_refused() -> None:
    with pytest.raises(TrustError, match="v3 expired at"):
        check_successor(HELD, [tk(ROOT)], trust(3, expires=NOW - 1), NOW)


def test_root_rotation_needs_both_signatures_then_only_the_new_root_signs() -> None:
    rotated = signed_doc(3, roots=(ROOT2,))
    with pytest.raises(TrustError, match="changes the root keys but is not signed by the new ones"):
        check_successor(HELD, [tk(ROOT)], decode_trust(sealed(rotated, ROOT)), NOW)
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        check_successor(HELD, [tk(ROOT)], decode_trust(sealed(rotated, ROOT2)), NOW)
    new = decode_trust(sealed(rotated, ROOT, ROOT2))
    check_successor(HELD, [tk(ROOT)], new, NOW)
    # From then on the old root (however it leaked, even though it is still pinned) signs nothing.
    with pytest.raises(TrustError, match="v4 is not signed by a trusted root key"):
        check_successor(new.signed, [tk(ROOT)], trust(4, ROOT, roots=(ROOT2,)), NOW)
    with pytest.raises(TrustError, match="not signed by a trusted root key"):
        check_successor(new.signed, [tk(ROOT)], trust(4, ROOT, roots=(ROOT,)), NOW)
    check_successor(new.signed, [tk(ROOT)], trust(4, ROOT2, roots=(ROOT2,)), NOW)


def test_key_ids_must_match_their_public_keys() -> None:
    doc = signed_doc(3)
    kid = tk(RELEASE).key_id
    doc["keys"][kid]["public"] = b64(FOREIGN)
    with pytest.raises(TrustError, match=f"key id {kid} does not match its public key"):
        decode_trust(sealed(doc, ROOT))
    doc = signed_doc(3)
    doc["root_keys"] = {tk(ROOT).key_id: b64(FOREIGN)}
    with pytest.raises(TrustError, match=r"root key id .* does not match"):
        decode_trust(sealed(doc, ROOT))


def test_key_problem() -> None:
    doc = trust(
        3,
        keys={RELEASE: ("release", NOW + DAY), OPERATOR: ("operator", NOW - 1)},
        revoked=(FOREIGN,),
    ).signed
    rel, op, foreign = tk(RELEASE).key_id, tk(OPERATOR).key_id, tk(FOREIGN).key_id
    assert doc.key_problem(rel, "release", NOW) is None
    assert (
        doc.key_problem(foreign, "release", NOW) == f"key {foreign} is revoked (trust document v3)"
    )
    assert (
        doc.key_problem(rel, "operator", NOW) == f"key {rel} is a release key, not an operator key"
    )
    assert doc.key_problem(op, "operator", NOW) == (
        f"operator key {op} expired at {doc.keys[op].expires}"
    )
    unknown = tk(ROOT2).key_id
    assert doc.key_problem(unknown, "operator", NOW) == (
        f"key {unknown} is not an operator key in trust document v3"
    )
    assert [k.key_id for k in doc.role_keys("release", NOW)] == [rel]
    assert doc.role_keys("operator", NOW) == []


# ------------------------------------------------------------------------------ envelopes


def test_a_good_envelope_passes() -> None:
    check(envelope())
    check(envelope("deployment", {"group": "lab"}), "deployment", Target(group="lab"))


def test_wrong_type_refused() -> None:
    with pytest.raises(TrustError, match="a signed deployment where a command was expected"):
        check(envelope("deployment"))


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ({"device": "dev2"}, "command is for device dev2, not device dev1"),
        ({"group": "dev1"}, "command is for group dev1, not device dev1"),
    ],
)
def test_mis_targeted_refused(target: dict[str, str], reason: str) -> None:
    with pytest.raises(TrustError, match=reason):
        check(envelope(target=target))


def test_group_target_refused_on_another_group() -> None:
    with pytest.raises(TrustError, match="deployment is for group lab, not group prod"):
        check(envelope("deployment", {"group": "lab"}), "deployment", Target(group="prod"))


def test_foreign_key_refused() -> None:
    kid = tk(FOREIGN).key_id
    with pytest.raises(TrustError, match=f"command refused: key {kid} is not an operator key"):
        check(envelope(signer=FOREIGN))


def test_release_key_cannot_act_as_operator() -> None:
    kid = tk(RELEASE).key_id
    with pytest.raises(TrustError, match=f"key {kid} is a release key, not an operator key"):
        check(envelope(signer=RELEASE))


def test_tampered_body_refused() -> None:
    env = envelope(body={"id": "c1", "op": "rollback", "version": "1.1.0"})
    env["signed"]["body"]["version"] = "1.0.0"
    with pytest.raises(TrustError, match="bad signature \\(modified after signing\\)"):
        check(env)
    env = envelope()
    env["signatures"][0]["sig"] = "not base64!"
    with pytest.raises(TrustError, match="bad signature"):
        check(env)


def test_expired_and_future_envelopes_refused() -> None:
    with pytest.raises(TrustError, match="command expired at"):
        check(envelope(issued=NOW - 700, expires=NOW - 100))
    check(envelope(issued=NOW + MAX_CLOCK_SKEW_S - 10))  # clock skew is tolerated
    with pytest.raises(TrustError, match=r"command is issued in the future .*check the clocks"):
        check(envelope(issued=NOW + MAX_CLOCK_SKEW_S + 60, expires=NOW + 3600))


def test_unsigned_message_refused() -> None:
    with pytest.raises(TrustError, match="unsigned message"):
        decode_envelope(b'{"id": "x", "op": "rollback", "version": "1.0.0"}', 65536)
    with pytest.raises(TrustError, match="envelope of 70000 bytes exceeds"):
        decode_envelope(b" " * 70000, 65536)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e400"])
def test_non_finite_number_in_a_signed_body_is_refused(value: str) -> None:
    """json.loads takes NaN, Infinity and 1e400 (inf); canonical JSON cannot encode them, so the
    signed bytes cannot be rebuilt: a TrustError, not a ValueError out of the agent."""
    env = json.dumps(envelope()).replace('"op": "status"', f'"op": "status", "x": {value}')
    with pytest.raises(TrustError, match="cannot be signed"):
        check_envelope(decode_envelope(env.encode(), 65536), HELD, "command", DEV, NOW)


# ------------------------------------------------------------------------------ property

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=25,
)
# Near-valid documents: real shapes with one part replaced, so the checks past parsing run too.
GOOD_TRUST = json.loads(sealed(signed_doc(3), ROOT))
GOOD_ENV = envelope()


def _mutate(base: dict[str, Any], path: list[str], value: Any) -> bytes:
    doc = json.loads(json.dumps(base))
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return json.dumps(doc).encode()


TRUST_PATHS = [
    ["signed"],
    ["signatures"],
    ["signed", "version"],
    ["signed", "expires"],
    ["signed", "root_keys"],
    ["signed", "keys"],
    ["signed", "revoked"],
]
ENV_PATHS = [
    ["signed"],
    ["signatures"],
    ["signed", "target"],
    ["signed", "issued"],
    ["signed", "expires"],
    ["signed", "counter"],
    ["signed", "body"],
]

payloads = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.tuples(st.sampled_from(TRUST_PATHS), json_values).map(lambda t: _mutate(GOOD_TRUST, *t))
    | st.tuples(st.sampled_from(ENV_PATHS), json_values).map(lambda t: _mutate(GOOD_ENV, *t))
)


@given(payloads)
def test_arbitrary_payloads_raise_only_trust_errors(payload: bytes) -> None:
    try:
        doc = decode_trust(payload)
        check_successor(HELD, [tk(ROOT)], doc, NOW)
    except (TrustError, MessageError):
        pass
    for kind in ("command", "deployment"):
        try:
            env = decode_envelope(payload, 65536)
            check_envelope(env, HELD, kind, DEV, NOW)
            env.digest()
        except (TrustError, MessageError):
            pass
