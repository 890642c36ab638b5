"""One artifact being fetched: its announcement, chunk store and the window of chunk topics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.protocol import topics
from agent.protocol.manifest import Manifest
from agent.protocol.messages import ArtifactAnnouncement, Deployment
from agent.store.chunks import ChunkStore
from agent.transport.base import Transport


@dataclass
class FetchJob:
    desired: Deployment
    ann: ArtifactAnnouncement | None = None
    manifest: Manifest | None = None
    store: ChunkStore | None = None
    inflight: set[int] = field(default_factory=set)
    cursor: int = 0
    started: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    next_report: float = 0.1
    finished: float | None = None
    bad_chunks: dict[int, int] = field(default_factory=dict)

    @property
    def sha(self) -> str:
        return self.desired.sha256

    def fill_window(self, transport: Transport, window: int) -> None:
        """Subscribe to the next missing chunks until ``window`` are in flight."""
        store = self.store
        if store is None:
            return
        want: list[int] = []
        n = len(store.done)
        while self.cursor < n and len(self.inflight) + len(want) < window:
            i = self.cursor
            self.cursor += 1
            if not store.done[i] and i not in self.inflight:
                want.append(i)
        if want:
            self.inflight.update(want)
            transport.subscribe([topics.artifact_chunk(self.sha, i) for i in want])

    def landed(self, transport: Transport, index: int, size: int) -> None:
        self.inflight.discard(index)
        transport.unsubscribe([topics.artifact_chunk(self.sha, index)])
        self.fetched_chunks += 1
        self.fetched_bytes += size
        self.last_progress = time.monotonic()

    def retry(self, transport: Transport, index: int) -> None:
        name = topics.artifact_chunk(self.sha, index)
        transport.unsubscribe([name])
        transport.subscribe([name])

    def resubscribe(self, transport: Transport) -> None:
        """After a stall: ask again for every chunk in flight (the broker resends retained ones)."""
        names = [topics.artifact_chunk(self.sha, i) for i in sorted(self.inflight)]
        transport.unsubscribe(names)
        transport.subscribe(names)
        self.last_progress = time.monotonic()

    def cancel(self, transport: Transport) -> None:
        names = [topics.artifact_chunk(self.sha, i) for i in sorted(self.inflight)]
        names.append(topics.artifact_manifest(self.sha))
        transport.unsubscribe(names)
        self.inflight.clear()
        if self.store is not None:
            self.store.close()

    def stats(self) -> dict[str, object]:
        secs = max((self.finished or time.monotonic()) - self.started, 1e-9)
        store = self.store
        return {
            "chunks": len(store.done) if store else 0,
            "fetched_chunks": self.fetched_chunks,
            "fetched_bytes": self.fetched_bytes,
            "resumed_chunks": store.resumed_chunks if store else 0,
            "refetched_chunks": store.duplicate_chunks if store else 0,
            "seconds": round(secs, 4),
            "mb_per_s": round(self.fetched_bytes / secs / 1e6, 3),
        }
