"""Set the desired deployment of a device or a group (a retained, operator-signed envelope).

NAME@VERSION is resolved to an artifact sha256 through the retained index the publisher keeps
at edgefleet/v1/artifacts/index/NAME/VERSION/PROFILE. When several profiles exist, the one
asked for (--profile), else the device's (from its retained state), else the group's name.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.broker import BrokerConfig
from agent.errors import BrokerUnfitError, UsageError
from agent.protocol import topics
from agent.protocol.manifest import VERSION_RE
from agent.protocol.messages import (
    MAX_ANNOUNCEMENT_BYTES,
    ArtifactAnnouncement,
    Deployment,
    IndexEntry,
    MessageError,
    decode,
)
from agent.protocol.trust import Target
from fleet.brokercheck import explain_missing_index
from fleet.mqtt import SyncClient
from fleet.trust import Operator

LOOKUP_TRIES = 3
SPEC_RE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62})@(\S+)$")


@dataclass(frozen=True)
class DeployResult:
    topic: str
    deployment: Deployment
    warnings: tuple[str, ...] = ()


def parse_spec(spec: str) -> tuple[str, str]:
    m = SPEC_RE.match(spec)
    if not m or not VERSION_RE.match(m.group(2)):
        raise UsageError(f"'{spec}': expected NAME@VERSION such as digits@1.2.0")
    return m.group(1), m.group(2)


def _device_profile(c: SyncClient, device: str) -> str | None:
    got = c.retained(topics.device_topic(device, "state"), quiet=0.3, limit=1.5)
    for payload in got.values():
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        if isinstance(doc, dict) and isinstance(doc.get("profile"), str):
            return str(doc["profile"])
    return None


def resolve(
    c: SyncClient,
    name: str,
    version: str,
    profile: str | None,
    device: str | None,
    group: str | None,
) -> IndexEntry:
    found: dict[str, IndexEntry] = {}
    # bounded retries: a broker may answer a publish before its retained copy is visible (amqtt)
    for attempt in range(LOOKUP_TRIES):
        for payload in c.retained(topics.artifact_index_versions(name, version)).values():
            try:
                e = decode(IndexEntry, payload)
            except MessageError:
                continue
            if (e.name, e.version) == (name, version):  # a loose broker may send other topics too
                found[e.profile] = e
        if found:
            break
        if attempt < LOOKUP_TRIES - 1:
            time.sleep(0.5)
    if not found:
        why = explain_missing_index(c)  # a broker that breaks the lookup, rather than no artifact
        if why:
            raise BrokerUnfitError(f"{name}@{version} cannot be looked up on {c.cfg.url}: {why}")
        raise UsageError(
            f"{name}@{version} is not published on {c.cfg.url} (run `edgefleet publish` first)"
        )
    if profile is None and device is not None:
        profile = _device_profile(c, device)
    if profile is None and group is not None and group in found:
        profile = group
    if profile is None and len(found) == 1:
        profile = next(iter(found))
    if profile is None or profile not in found:
        raise UsageError(
            f"{name}@{version} is published for profiles {', '.join(sorted(found))}; "
            f"choose one with --profile" + (f" ('{profile}' has none)" if profile else "")
        )
    return found[profile]


def chunk_digest(c: SyncClient, entry: IndexEntry) -> str:
    """The chunk table digest a deployment signs: from the index entry, else the announcement."""
    if entry.chunks_sha256 is not None:
        return entry.chunks_sha256
    payload = c.retained_one(topics.artifact_manifest(entry.sha256), limit=5.0)
    if payload is None:
        raise UsageError(
            f"{entry.name}@{entry.version} ({entry.sha256[:16]}) has no announcement on "
            f"{c.cfg.url}: publish it again"
        )
    try:
        return decode(ArtifactAnnouncement, payload, MAX_ANNOUNCEMENT_BYTES).table_digest()
    except MessageError as exc:
        raise UsageError(
            f"the announcement of {entry.name}@{entry.version} is invalid: {exc}"
        ) from None


def desired(c: SyncClient, entry: IndexEntry) -> Deployment:
    """The desired state for the published ``entry``: what it is and its signed size and table."""
    return Deployment(
        name=entry.name,
        version=entry.version,
        sha256=entry.sha256,
        size=entry.size,
        chunks_sha256=chunk_digest(c, entry),
        profile=entry.profile,
        deployed_at=now_iso(),
    )


def publish_desired(
    c: SyncClient, operator: Operator, target: Target, dep: Deployment | None
) -> str:
    """Seal ``dep`` for ``target`` and retain it on the target's deployment topic (``None``
    clears it: the device or group then follows nothing, or its group's deployment)."""
    topic = (
        topics.device_topic(target.device, "deployment")
        if target.device is not None
        else topics.group_deployment(target.group or "")
    )
    payload = (
        b""
        if dep is None
        else operator.deployment(target, dep.model_dump(mode="json", exclude_none=True))
    )
    c.publish(topic, payload, retain=True)
    return topic


def capture_keys(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as a deployment's ``capture`` keys, checked as the device checks them
    ([capture] of the agent's config). ``off`` alone turns capture off for the deployment;
    otherwise ``enabled`` defaults to true. Values are JSON (numbers, true/false) or strings;
    ``triggers`` is a comma-separated list."""
    from pydantic import ValidationError

    from agent.protocol.capture import CaptureConfig

    if list(pairs) == ["off"]:
        return {"enabled": False}
    keys: dict[str, Any] = {"enabled": True}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"--capture {pair!r}: give KEY=VALUE (or 'off')")
        if key == "triggers":
            keys[key] = [t for t in value.split(",") if t]
            continue
        try:
            keys[key] = json.loads(value)
        except ValueError:
            keys[key] = value
    try:
        CaptureConfig.model_validate(keys)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UsageError(f"--capture {where}: {err['msg']}") from None
    return keys


def deploy(
    broker: BrokerConfig,
    spec: str,
    operator: Operator,
    device: str | None = None,
    group: str | None = None,
    profile: str | None = None,
    client: SyncClient | None = None,
    capture: dict[str, Any] | None = None,
) -> DeployResult:
    """Set the desired model of ``device`` or ``group``; ``capture`` keys (``capture_keys``)
    turn feedback capture on or off for it (the same version deployed again with capture keys
    changes only the capture: nothing is downloaded or reinstalled)."""
    if (device is None) == (group is None):
        raise UsageError("give exactly one of --device ID or --group G")
    name, version = parse_spec(spec)
    try:
        target = Target(device=device, group=group)
    except ValueError as exc:
        raise UsageError(
            f"invalid {'device id' if device else 'group'}: {str(exc).splitlines()[-1].strip()}"
        ) from None
    own = client is None
    c = client or SyncClient(broker).__enter__()
    try:
        entry = resolve(c, name, version, profile, device, group)
        dep = desired(c, entry)
        if capture is not None:
            dep = dep.model_copy(update={"capture": capture})
        topic = publish_desired(c, operator, target, dep)
        c.flush()
        warnings = () if group is None else _unfollowed(c, group)
    finally:
        if own:
            c.close()
    return DeployResult(topic, dep, warnings)


def _unfollowed(c: SyncClient, group: str) -> tuple[str, ...]:
    """A warning when no device's retained state lists ``group`` (a typo, or none connected yet)."""
    states = c.retained(f"{topics.PREFIX}/devices/+/state", quiet=0.3, limit=3.0)
    for payload in states.values():
        with contextlib.suppress(ValueError):
            doc = json.loads(payload)
            if isinstance(doc, dict) and group in (doc.get("groups") or []):
                return ()
    return (
        f"no device on {c.cfg.url} follows group '{group}' (none lists it in its state); "
        f"devices that join it later will pick the deployment up",
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
