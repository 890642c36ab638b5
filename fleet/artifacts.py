"""Artifact lifecycle on the broker: what is retained, what deployments name, what to prune.

Every published artifact stays retained (manifest, chunks, index entries) until cleared, so
broker memory and every bridge resync grow with each release. ``plan`` is a pure function over
the retained topics (their sizes, and the payloads of manifests, index entries and
deployments): it keeps every artifact a device or group deployment names, plus the newest
``keep`` per model line (name + profile, by version), and lists the rest for removal.
``scan`` reads the retained topics from a broker; ``prune`` clears them (an empty retained
payload), index entries first and chunks last, so nothing new starts fetching what is going.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import topics
from agent.protocol.manifest import version_key
from agent.protocol.trust import parse_time
from fleet.mqtt import SyncClient

ARTIFACTS = f"{topics.PREFIX}/artifacts/#"
DEPLOYMENTS = (f"{topics.PREFIX}/devices/+/deployment", f"{topics.PREFIX}/groups/+/deployment")


@dataclass
class Retained:
    """What the broker retains under the artifact and deployment topics: every topic's payload
    size, and the payload of every topic that is not a chunk."""

    sizes: dict[str, int] = field(default_factory=dict)
    docs: dict[str, bytes] = field(default_factory=dict)
    dropped: int = 0  # messages the reading client had no room for (the scan is incomplete)

    def add(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared topic
            self.sizes.pop(topic, None)
            self.docs.pop(topic, None)
            return
        self.sizes[topic] = len(payload)
        t = topics.parse(topic)
        if t is None or t.kind != "chunk":
            self.docs[topic] = payload


@dataclass(frozen=True)
class Reference:
    """A retained deployment and the artifact its signed body names."""

    topic: str
    target: str  # "device ID" or "group G"
    sha256: str
    name: str
    version: str
    expires: str
    expired: bool


@dataclass
class Artifact:
    sha256: str
    name: str = ""
    version: str = ""
    profile: str = ""
    size: int = 0  # the artifact's bytes (from its manifest or index entry)
    chunks: int = 0  # chunk topics retained
    chunk_table: int = 0  # chunks its manifest announces (0: no manifest)
    published: str = ""
    topics: list[str] = field(default_factory=list)
    retained_bytes: int = 0  # payload bytes of all its retained topics
    refs: list[Reference] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.chunk_table > 0 and self.chunks == self.chunk_table

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "profile": self.profile,
            "sha256": self.sha256,
            "size": self.size,
            "chunks": self.chunks,
            "complete": self.complete,
            "published": self.published,
            "retained_bytes": self.retained_bytes,
            "topics": len(self.topics),
            "deployed_to": [
                {"target": r.target, "expires": r.expires, "expired": r.expired} for r in self.refs
            ],
        }


@dataclass
class Inventory:
    artifacts: dict[str, Artifact]
    refs: list[Reference]
    warnings: list[str]


@dataclass(frozen=True)
class Plan:
    remove: list[Artifact]
    keep: list[Artifact]
    warnings: list[str]

    @property
    def topics(self) -> list[str]:
        """Topics to clear, in a safe order: index entries, then manifests, then chunks."""
        rank = {"index": 0, "manifest": 1}
        out = [t for a in self.remove for t in a.topics]
        return sorted(out, key=lambda t: rank.get(getattr(topics.parse(t), "kind", ""), 2))

    @property
    def bytes_freed(self) -> int:
        return sum(a.retained_bytes for a in self.remove)


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


def reference(topic: str, payload: bytes, now: float) -> Reference | str:
    """The artifact a retained deployment envelope names (signatures are not checked: a listing
    reads it as a device would before verifying), or why it cannot be read."""
    t = topics.parse(topic)
    target = (
        f"device {t.device}" if t and t.kind == "device_deployment" else f"group {t and t.group}"
    )
    doc = _json(payload)
    signed = doc.get("signed") if isinstance(doc, dict) else None
    body = signed.get("body") if isinstance(signed, dict) else None
    sha = body.get("sha256") if isinstance(body, dict) else None
    if not isinstance(signed, dict) or not isinstance(body, dict) or not isinstance(sha, str):
        return f"{topic}: not a signed deployment (no signed.body.sha256)"
    expires = signed.get("expires")
    expires = expires if isinstance(expires, str) else ""
    try:
        expired = bool(expires) and parse_time(expires) <= now
    except ValueError:
        expired = False
    return Reference(
        topic,
        target,
        sha,
        str(body.get("name", "")),
        str(body.get("version", "")),
        expires,
        expired,
    )


def inventory(retained: Retained, now: float | None = None) -> Inventory:
    """Artifacts by sha256, from the retained manifests, chunks and index entries, each with
    the deployments that name it."""
    now = time.time() if now is None else now
    arts: dict[str, Artifact] = {}
    refs: list[Reference] = []
    warnings: list[str] = []

    def art(sha: str) -> Artifact:
        return arts.setdefault(sha, Artifact(sha))

    for topic, size in sorted(retained.sizes.items()):
        t = topics.parse(topic)
        payload = retained.docs.get(topic, b"")
        if t is None:
            continue
        if t.kind in ("device_deployment", "group_deployment"):
            ref = reference(topic, payload, now)
            if isinstance(ref, str):
                warnings.append(ref)
            else:
                refs.append(ref)
            continue
        if t.kind == "chunk" and t.sha256:
            a = art(t.sha256)
            a.chunks += 1
        elif t.kind == "manifest" and t.sha256:
            a = art(t.sha256)
            doc = _json(payload)
            if isinstance(doc, dict):
                a.name = str(doc.get("name", a.name))
                a.version = str(doc.get("version", a.version))
                a.profile = str(doc.get("profile", a.profile))
                a.size = doc["size"] if isinstance(doc.get("size"), int) else a.size
                a.published = str(doc.get("published", a.published))
                ch = doc.get("chunks")
                a.chunk_table = len(ch) if isinstance(ch, list) else 0
        elif t.kind == "index":
            doc = _json(payload)
            sha = doc.get("sha256") if isinstance(doc, dict) else None
            if not isinstance(doc, dict) or not isinstance(sha, str):
                warnings.append(f"{topic}: unreadable index entry (left alone)")
                continue
            a = art(sha)
            a.name = a.name or (t.name or "")
            a.version = a.version or (t.version or "")
            a.profile = a.profile or (t.profile or "")
            a.size = a.size or (doc["size"] if isinstance(doc.get("size"), int) else 0)
            a.published = a.published or str(doc.get("published", ""))
        else:
            continue
        a.topics.append(topic)
        a.retained_bytes += size
    for r in refs:
        if r.sha256 in arts:
            arts[r.sha256].refs.append(r)
        else:
            warnings.append(
                f"{r.target} is deployed {r.name}@{r.version} ({r.sha256[:16]}), "
                "which is not on the broker"
            )
    return Inventory(arts, refs, warnings)


def _vkey(version: str) -> tuple[int, ...]:
    try:
        return version_key(version)
    except ValueError:
        return (-1,)


def plan(retained: Retained, keep: int = 2, now: float | None = None) -> Plan:
    """Which artifacts to remove: those no deployment names, beyond the newest ``keep`` per
    model line (name + profile, by version; an artifact without a manifest or index entry has
    no line and is kept only when deployed). Deployed ones never go and do not count in ``keep``."""
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    inv = inventory(retained, now)
    lines: dict[tuple[str, str], list[Artifact]] = {}
    for a in inv.artifacts.values():
        if not a.refs and a.name:
            lines.setdefault((a.name, a.profile), []).append(a)
    newest = {
        a.sha256
        for line in lines.values()
        for a in sorted(line, key=lambda a: (_vkey(a.version), a.published), reverse=True)[:keep]
    }
    remove: list[Artifact] = []
    kept: list[Artifact] = []
    for a in sorted(inv.artifacts.values(), key=lambda a: (a.name, a.profile, _vkey(a.version))):
        (kept if a.refs or a.sha256 in newest else remove).append(a)
    return Plan(remove, kept, inv.warnings)


# ------------------------------------------------------------------------------ broker side


def scan(
    c: SyncClient,
    quiet: float = 1.0,
    limit: float = 600.0,
    progress: Callable[[int], None] | None = None,
) -> Retained:
    """Read every retained artifact and deployment topic; done when none came for ``quiet`` s.

    Chunk payloads are counted, not kept, so memory stays bounded by the listener's queue."""
    got = Retained()
    li = c.listen([(ARTIFACTS, 1), *[(p, 1) for p in DEPLOYMENTS]], wait=True)
    end = time.monotonic() + limit
    try:
        while (left := end - time.monotonic()) > 0:
            item = li.get(min(quiet, left))
            if item is None:
                break
            got.add(item.topic, item.payload)
            if progress is not None:
                progress(1)
    finally:
        c.unlisten(li)
    got.dropped = li.dropped
    return got


def deployed_now(c: SyncClient) -> set[str]:
    """The sha256 every retained deployment names right now (read again just before clearing)."""
    got = Retained()
    li = c.listen([(p, 1) for p in DEPLOYMENTS], wait=True)
    try:
        while (item := li.get(0.5)) is not None:
            got.add(item.topic, item.payload)
    finally:
        c.unlisten(li)
    return {r.sha256 for r in inventory(got).refs}


def prune(
    c: SyncClient, p: Plan, progress: Callable[[int], None] | None = None
) -> tuple[Plan, list[str]]:
    """Clear the topics of ``p``'s artifacts. Deployments are read again first: an artifact
    deployed since the scan stays. Returns what was removed and the topics cleared."""
    late = deployed_now(c)
    if late & {a.sha256 for a in p.remove}:
        keep = [a for a in p.remove if a.sha256 in late]
        p = Plan(
            [a for a in p.remove if a.sha256 not in late],
            p.keep + keep,
            p.warnings + [f"{a.name}@{a.version} was deployed meanwhile: kept" for a in keep],
        )
    cleared = p.topics
    for topic in cleared:
        c.publish(topic, b"", retain=True)
        if progress is not None:
            progress(1)
    c.flush()
    return p, cleared
