"""Publish an artifact to the broker: chunks, then the announcement, then the index entry, all
retained. The announcement goes last, so its presence means every chunk is there; publishing
the same artifact again is a no-op unless forced (the same bytes give the same topics).
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.broker import BrokerConfig
from agent.errors import IntegrityError, UsageError
from agent.protocol import topics
from agent.protocol.artifact import verify_artifact
from agent.protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, parse_manifest
from agent.protocol.messages import (
    ArtifactAnnouncement,
    ChunkRef,
    IndexEntry,
    MessageError,
    decode,
    encode,
)
from fleet.brokercheck import unseen_error
from fleet.mqtt import SyncClient

DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class PublishResult:
    sha256: str
    name: str
    version: str
    profile: str
    chunks: int
    size: int
    skipped: bool
    seconds: float


def read_head(path: Path) -> tuple[dict[str, Any], str]:
    """manifest.json (parsed) and manifest.sig (text) of an artifact, without verifying it."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            docs: dict[str, bytes] = {}
            for name in (MANIFEST_NAME, SIGNATURE_NAME):
                try:
                    fh = tar.extractfile(name)
                except KeyError:
                    raise IntegrityError(
                        f"{path}: {name} is missing (unsigned or not an artifact)"
                    ) from None
                if fh is None:
                    raise IntegrityError(f"{path}: {name} is not a regular file")
                docs[name] = fh.read(4 * 1024 * 1024)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such artifact file") from None
    except tarfile.TarError as exc:
        raise IntegrityError(f"{path}: not an artifact tar ({exc})") from None
    try:
        doc = json.loads(docs[MANIFEST_NAME])
        sig = docs[SIGNATURE_NAME].decode()
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{path}: manifest.json or manifest.sig is unreadable") from None
    return doc, sig


def announcement(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ArtifactAnnouncement:
    """The chunk table (hashing the file once, a chunk at a time) plus the signed manifest."""
    doc, sig = read_head(path)
    m = parse_manifest(doc, f"{path.name}:manifest.json")
    whole = hashlib.sha256()
    chunks = []
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            whole.update(block)
            chunks.append(ChunkRef(size=len(block), sha256=hashlib.sha256(block).hexdigest()))
    size = sum(c.size for c in chunks)
    if size == 0:
        raise UsageError(f"{path}: empty file")
    return ArtifactAnnouncement(
        sha256=whole.hexdigest(),
        size=size,
        chunk_size=chunk_size,
        chunks=chunks,
        name=m.name,
        version=m.version,
        profile=m.profile,
        runtime=m.runtime,
        manifest=doc,
        signature=sig,
        published=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def publish_artifact(
    path: Path,
    broker: BrokerConfig,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    client: SyncClient | None = None,
    trusted: Sequence[Ed25519PublicKey] = (),
) -> PublishResult:
    """Publish ``path``; ``progress(n)`` is called with the number of chunks just sent.

    With ``trusted`` keys the artifact is verified first (signature, every file hash, canonical
    tar), as a device would. Re-pointing an index entry (NAME VERSION PROFILE already published
    as another artifact) moves every device that follows it, so it needs that verification,
    unless ``force``.
    """
    if chunk_size < 1024 or chunk_size > 16 * 1024 * 1024:
        raise UsageError("--chunk-size must be between 1 KiB and 16 MiB")
    t0 = time.monotonic()
    if trusted:
        verify_artifact(path, list(trusted))
    ann = announcement(path, chunk_size)
    own = client is None
    c = client or SyncClient(broker, client_id="").__enter__()
    try:
        if not force and not trusted:
            _refuse_unverified_repoint(c, ann)
        if not force:
            old = c.retained(topics.artifact_manifest(ann.sha256), quiet=0.3, limit=2.0)
            if old:
                try:
                    prev = json.loads(next(iter(old.values())))
                except ValueError:
                    prev = None
                if isinstance(prev, dict) and prev.get("chunk_size") == chunk_size:
                    return PublishResult(
                        ann.sha256,
                        ann.name,
                        ann.version,
                        ann.profile,
                        len(ann.chunks),
                        ann.size,
                        True,
                        time.monotonic() - t0,
                    )
        with path.open("rb") as fh:
            for i in range(len(ann.chunks)):
                c.publish(
                    topics.artifact_chunk(ann.sha256, i),
                    fh.read(chunk_size),
                    retain=True,
                    window=16,
                )
                if progress is not None:
                    progress(1)
        c.flush()
        entry = IndexEntry(
            name=ann.name,
            version=ann.version,
            profile=ann.profile,
            runtime=ann.runtime,
            sha256=ann.sha256,
            size=ann.size,
            published=ann.published,
            chunks_sha256=ann.table_digest(),
        )
        heads = {
            topics.artifact_manifest(ann.sha256): encode(ann),
            topics.artifact_index(ann.name, ann.version, ann.profile): encode(entry),
        }
        for topic, payload in heads.items():
            c.publish(topic, payload, retain=True)
        c.flush()
        _confirm_retained(c, broker, heads)
    finally:
        if own:
            c.close()
    return PublishResult(
        ann.sha256,
        ann.name,
        ann.version,
        ann.profile,
        len(ann.chunks),
        ann.size,
        False,
        time.monotonic() - t0,
    )


def _refuse_unverified_repoint(c: SyncClient, ann: ArtifactAnnouncement) -> None:
    current = c.retained_one(topics.artifact_index(ann.name, ann.version, ann.profile), limit=1.0)
    if current is None:
        return
    try:
        old = decode(IndexEntry, current)
    except MessageError:
        return
    if old.sha256 != ann.sha256:
        raise UsageError(
            f"{ann.name} {ann.version} for {ann.profile} is already published as another artifact "
            f"(sha256 {old.sha256[:16]}); replacing it re-points every device that follows it: give "
            f"--key PUB to verify this one first (or --force)"
        )


def _confirm_retained(c: SyncClient, broker: BrokerConfig, heads: dict[str, bytes]) -> None:
    """Read the announcement and index entry back on the publishing connection before it closes.

    A PUBACK does not promise the message is stored: amqtt (the demo's fallback broker) drops the
    retained messages it has not stored yet when the publisher disconnects (seen on Python 3.12:
    the last two of every publish, deterministically). The round trip on the same connection
    lets it finish; their presence is what tells devices and `deploy` that the artifact is there.
    When one does not come back, a quick probe tells a broker that rewrites topic names
    (RabbitMQ's MQTT plugin turns '.' into '/') from one that lost the message.
    """
    for topic, payload in heads.items():
        if c.retained_one(topic, limit=10.0) != payload:
            raise unseen_error(c, broker.url, topic)


def chunk_count(path: Path, chunk_size: int) -> int:
    return max(1, math.ceil(path.stat().st_size / chunk_size))
