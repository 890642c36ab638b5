"""MQTT topic names (edgefleet/v1/...): one builder per topic and one parser for all of them.

Every variable segment is validated so a topic can never gain or lose a level, or carry a
wildcard, whatever name a user or a message supplies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PREFIX = "edgefleet/v1"
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNKS = 1_000_000

TopicKind = Literal[
    "manifest",
    "chunk",
    "index",
    "group_deployment",
    "device_deployment",
    "state",
    "events",
    "telemetry",
    "cmd",
    "cmd_result",
    "samples",
    "trust",
]
_DEVICE_LEAVES: dict[str, TopicKind] = {
    "deployment": "device_deployment",
    "state": "state",
    "events": "events",
    "telemetry": "telemetry",
    "cmd": "cmd",
    "samples": "samples",  # opt-in feedback capture (messages.Sample)
}


def _seg(value: str, what: str) -> str:
    if not SEGMENT_RE.match(value):
        raise ValueError(f"invalid {what} {value!r} for a topic (letters, digits, '.', '_', '-')")
    return value


def _sha(value: str) -> str:
    if not SHA_RE.match(value):
        raise ValueError(f"invalid sha256 {value!r} (64 lowercase hex digits)")
    return value


def artifact_manifest(sha256: str) -> str:
    return f"{PREFIX}/artifacts/{_sha(sha256)}/manifest"


def artifact_chunk(sha256: str, index: int) -> str:
    if not 0 <= index < MAX_CHUNKS:
        raise ValueError(f"chunk index {index} out of range")
    return f"{PREFIX}/artifacts/{_sha(sha256)}/chunks/{index}"


def artifact_chunks_all(sha256: str) -> str:
    """Wildcard for every chunk of one artifact (for tools such as mosquitto_sub)."""
    return f"{PREFIX}/artifacts/{_sha(sha256)}/chunks/+"


def artifact_index(name: str, version: str, profile: str) -> str:
    return f"{PREFIX}/artifacts/index/{_seg(name, 'name')}/{_seg(version, 'version')}/{_seg(profile, 'profile')}"


def artifact_index_versions(name: str, version: str) -> str:
    """Wildcard over the profiles of NAME@VERSION in the index."""
    return f"{PREFIX}/artifacts/index/{_seg(name, 'name')}/{_seg(version, 'version')}/+"


def trust() -> str:
    """The retained, root-signed trust document (agent.protocol.trust)."""
    return f"{PREFIX}/trust"


def group_deployment(group: str) -> str:
    return f"{PREFIX}/groups/{_seg(group, 'group')}/deployment"


def device_topic(device: str, leaf: str) -> str:
    if leaf not in (*_DEVICE_LEAVES, "cmd/result"):
        raise ValueError(f"unknown device topic {leaf!r}")
    return f"{PREFIX}/devices/{_seg(device, 'device id')}/{leaf}"


@dataclass(frozen=True)
class Topic:
    kind: TopicKind
    sha256: str | None = None
    index: int | None = None
    group: str | None = None
    device: str | None = None
    name: str | None = None
    version: str | None = None
    profile: str | None = None


def parse(topic: str) -> Topic | None:
    """The parsed topic, or None for anything that is not a well-formed edgefleet topic."""
    if topic == trust():
        return Topic("trust")
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        return None
    rest = parts[2:]
    try:
        if rest[0] == "artifacts":
            if len(rest) == 5 and rest[1] == "index":
                return Topic(
                    "index",
                    name=_seg(rest[2], "name"),
                    version=_seg(rest[3], "version"),
                    profile=_seg(rest[4], "profile"),
                )
            if len(rest) == 3 and rest[2] == "manifest":
                return Topic("manifest", sha256=_sha(rest[1]))
            if (
                len(rest) == 4
                and rest[2] == "chunks"
                and re.fullmatch(r"0|[1-9][0-9]{0,5}", rest[3])
            ):
                return Topic("chunk", sha256=_sha(rest[1]), index=int(rest[3]))
        elif rest[0] == "groups" and len(rest) == 3 and rest[2] == "deployment":
            return Topic("group_deployment", group=_seg(rest[1], "group"))
        elif rest[0] == "devices" and len(rest) in (3, 4):
            device = _seg(rest[1], "device id")
            leaf = "/".join(rest[2:])
            if leaf == "cmd/result":
                return Topic("cmd_result", device=device)
            if leaf in _DEVICE_LEAVES:
                return Topic(_DEVICE_LEAVES[leaf], device=device)
    except ValueError:
        return None
    return None


def build(t: Topic) -> str:
    """Inverse of :func:`parse`."""
    if t.kind == "manifest":
        return artifact_manifest(t.sha256 or "")
    if t.kind == "chunk":
        return artifact_chunk(t.sha256 or "", t.index if t.index is not None else -1)
    if t.kind == "index":
        return artifact_index(t.name or "", t.version or "", t.profile or "")
    if t.kind == "group_deployment":
        return group_deployment(t.group or "")
    if t.kind == "trust":
        return trust()
    if t.kind == "cmd_result":
        return device_topic(t.device or "", "cmd/result")
    leaf = {v: k for k, v in _DEVICE_LEAVES.items()}[t.kind]
    return device_topic(t.device or "", leaf)
