"""The device's trust state, persisted in the state directory.

- ``trust.json``: the newest trust document accepted (agent.protocol.trust), verified against the
  pinned root key (config ``root_key``) or the root keys of the document held before it.
- ``counters.json``: per channel (a device's or a group's deployment, a device's commands) the
  counter and digest of the last envelope acted on, so a replayed or older one is refused.
- ``lines.json``: per model line (manifest name) the highest version ever activated and the
  security floor, so anti-rollback holds whatever is active and survives restarts.

Owned by the agent's worker thread. Writes are atomic (fsutil); a write that fails leaves the
previous file, and the caller reports the error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.protocol.manifest import Manifest, version_key
from agent.protocol.signing import TrustedKey
from agent.protocol.trust import (
    Envelope,
    Target,
    TrustError,
    TrustSigned,
    chain_links,
    check_envelope,
    check_successor,
    decode_envelope,
    decode_trust,
    parse_time,
)
from agent.store.fsutil import atomic_write, read_json, write_json

log = logging.getLogger("agent.deploy.trust")


class DeviceTrust:
    """What this device trusts now, and the counters and floors it has committed to."""

    def __init__(
        self,
        state_dir: Path,
        pinned: list[TrustedKey],
        initial: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = state_dir / "trust.json"
        self.counters_path = state_dir / "counters.json"
        self.pinned, self.clock = pinned, clock
        self._doc: TrustSigned | None = None
        # Why the provisioned document was not taken (shown while no document is held).
        self.problem: str | None = None
        if self.path.is_file():
            try:
                # Our own state: verified when it was accepted, not again at every start.
                self._doc = decode_trust(self.path.read_bytes()).signed
            except (OSError, TrustError):
                self._doc = None  # a damaged file: start again from the provisioned document
        # The provisioned document is checked here for shape only; its signature on first use
        # (cryptography costs ~8 MB resident: an idle agent that verifies nothing never loads it).
        self._pending: bytes | None = None
        self.initial = initial
        if initial is not None:
            try:
                payload = initial.read_bytes()
                new = decode_trust(payload)
            except OSError as exc:
                raise ConfigError(f"{initial}: cannot read the trust document ({exc})") from None
            except TrustError as exc:
                raise ConfigError(f"{initial}: {exc}") from None
            if self._doc is None or new.signed.version > self._doc.version:
                self._pending = payload
        raw = read_json(self.counters_path)
        self.counters: dict[str, dict[str, Any]] = raw if isinstance(raw, dict) else {}

    # -- the trust document ------------------------------------------------------------------
    @property
    def doc(self) -> TrustSigned | None:
        """The trust document held (the provisioned one is verified on the first call)."""
        if self._pending is not None:
            payload, self._pending = self._pending, None
            try:
                self.update(payload, persist=self.path.parent.is_dir())
            except TrustError as exc:
                if self._doc is None:
                    self.problem = f"provisioned trust document {self.initial}: {exc}"
        return self._doc

    def verify_now(self) -> None:
        """Check the provisioned document's signature now (check-config); ConfigError if refused."""
        if self.doc is None and self.problem is not None:
            raise ConfigError(self.problem)

    def update(self, payload: bytes, persist: bool = True) -> bool:
        """Take a trust document; True when it replaced the one held, False when it is the same
        version again (a retained redelivery). Raise TrustError when it is refused."""
        new = decode_trust(payload)
        held = self.doc
        if held is not None and new.signed == held:
            return False
        now = self.clock()
        base = held
        # Root rotations this device missed: walk them in order (an intermediate document's
        # expiry does not matter, as in TUF; only the document taken must be fresh).
        for link in chain_links(new):
            if base is not None and link.signed.version <= base.version:
                continue
            try:
                check_successor(base, self.pinned, link, now, check_expiry=False)
            except TrustError:
                break
            base = link.signed
        if base is None or base != new.signed:
            check_successor(base, self.pinned, new, now)
        if persist:
            try:
                atomic_write(self.path, payload)
            except OSError as exc:  # held in memory; the retained copy is taken again at restart
                log.error("cannot save trust.json: %s", exc)
        self._doc = new.signed
        self.problem = None
        return True

    @property
    def version(self) -> int:
        doc = self.doc
        return doc.version if doc is not None else 0

    def _held(self) -> TrustSigned:
        doc = self.doc
        if doc is None:
            raise TrustError(
                self.problem
                or "no trust document yet (provision one, or publish it: edgefleet keys publish)"
            )
        if parse_time(doc.expires) <= self.clock():
            raise TrustError(
                f"trust document v{doc.version} expired at {doc.expires} "
                "(renew it: edgefleet keys renew --broker URL)"
            )
        return doc

    def release_keys(self) -> list[TrustedKey]:
        """The release keys an artifact may be signed by now (none without a valid document)."""
        try:
            doc = self._held()
        except TrustError:
            return []
        return doc.role_keys("release", self.clock())

    def release_problem(self) -> str | None:
        """Why no artifact can be verified now (no document, or it expired), or None."""
        try:
            self._held()
        except TrustError as exc:
            return str(exc)
        return None

    def key_problem(self, key_id: str, role: str) -> str | None:
        """Why ``key_id`` may not sign as ``role`` now (None: it may, or no document is held)."""
        doc = self.doc
        return None if doc is None else doc.key_problem(key_id, role, self.clock())

    def revoked(self, key_id: str) -> str | None:
        """Why an installed artifact signed by ``key_id`` may no longer serve or be rolled back
        to: the key is revoked or no longer listed as a release key. An expired key is not a
        reason to stop serving what it signed while it was valid (it signs nothing new)."""
        doc = self.doc
        if doc is None or not key_id:
            return None
        if key_id in doc.revoked:
            return f"release key {key_id} is revoked (trust document v{doc.version})"
        entry = doc.keys.get(key_id)
        if entry is None or entry.role != "release":
            return f"key {key_id} is no longer a release key (trust document v{doc.version})"
        return None

    # -- envelopes -----------------------------------------------------------------------------
    def open(
        self, payload: bytes, kind: str, target: Target, channel: str, max_bytes: int
    ) -> tuple[Envelope, bool]:
        """Verify an envelope for ``channel``; (envelope, new). ``new`` is False for the envelope
        acted on last, delivered again (a retained deployment on reconnect). Raise TrustError."""
        env = decode_envelope(payload, max_bytes)
        last = self.counters.get(channel) or {}
        last_counter = int(last.get("counter", 0))
        counter = env.signed.counter
        if counter == last_counter and last.get("digest") == env.digest():
            # The very bytes verified and acted on before (sha256 of the signed part): no new
            # signature check, so an agent that restarts and is sent its retained deployment
            # again loads no cryptography. A signer revoked since still makes it refused.
            held = self._held()
            now = self.clock()
            if all(held.key_problem(s.key_id, "operator", now) for s in env.signatures):
                check_envelope(env, held, kind, target, now)  # raises with the reason
            return env, False
        check_envelope(env, self._held(), kind, target, self.clock())
        if counter <= last_counter:
            raise TrustError(
                f"{kind} counter {counter} is not above the last one acted on ({last_counter}): "
                "replayed or out of order"
            )
        return env, True

    def commit(self, channel: str, env: Envelope) -> None:
        """Record ``env`` as acted on: nothing at or below its counter is taken again."""
        self.counters[channel] = {"counter": env.signed.counter, "digest": env.digest()}
        try:
            write_json(self.counters_path, self.counters)
        except OSError as exc:
            # A full disk must not stop the device acting on a valid message: the counter holds
            # in memory and is written with the next one (a restart before that forgets it, and
            # only an envelope acted on already, still unexpired, could then be replayed).
            log.error("cannot save counters.json: %s", exc)


class Lines:
    """Anti-rollback per model line: the highest version activated and the security floor.

    A deployment may not install a version below the highest one ever activated (go back with
    the rollback command, to a kept version); no version below the floor may run at all. The
    floor rises when an activated manifest names ``security_floor``.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lines.json"
        raw = read_json(self.path)
        self.lines: dict[str, dict[str, str]] = raw if isinstance(raw, dict) else {}

    def _get(self, name: str, key: str) -> str | None:
        v = (self.lines.get(name) or {}).get(key)
        return v if isinstance(v, str) else None

    def floor(self, name: str) -> str | None:
        return self._get(name, "floor")

    def install_problem(self, m: Manifest) -> str | None:
        highest = self._get(m.name, "highest")
        if highest is not None and version_key(m.version) < version_key(highest):
            return (
                f"{m.name} {m.version} is older than {highest}, activated on this device before "
                "(anti-rollback; use the rollback command to go back to a kept version)"
            )
        return self.run_problem(m)

    def run_problem(self, m: Manifest) -> str | None:
        floor = self.floor(m.name)
        if floor is not None and version_key(m.version) < version_key(floor):
            return f"{m.name} {m.version} is below the security floor {floor}"
        return None

    def record(self, m: Manifest) -> None:
        """``m`` was activated: raise the line's highest version and floor."""
        line = dict(self.lines.get(m.name) or {})
        old = line.get("highest")
        if old is None or version_key(m.version) > version_key(old):
            line["highest"] = m.version
        sf = m.security_floor
        if sf is not None and (
            line.get("floor") is None or version_key(sf) > version_key(line["floor"])
        ):
            line["floor"] = sf
        if line != self.lines.get(m.name):
            self.lines[m.name] = line
            write_json(self.path, self.lines)
