"""The FETCHING phase: one artifact's announcement, chunk store and window of chunk topics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.deploy.machine import Machine, Phase
from agent.deploy.outbox import Outbox, log
from agent.deploy.policy import Policy
from agent.errors import EdgefleetError, IntegrityError
from agent.protocol import topics
from agent.protocol.manifest import Manifest
from agent.protocol.messages import (
    MAX_ANNOUNCEMENT_BYTES,
    ArtifactAnnouncement,
    Deployment,
    MessageError,
    PendingDeployment,
    decode,
)
from agent.store.chunks import ChunkStore, discard_download
from agent.store.space import allocated, check_size, is_disk_full, space_short
from agent.store.versions import Installed
from agent.transport.base import Transport

CHUNK_RETRIES = 3


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
    # Waiting for disk space: the announcement is asked for again at this time (monotonic).
    retry_at: float | None = None
    deferred: bool = False  # made by wait_for_space (chunks left over from before are ignored)
    created: float = field(default_factory=time.monotonic)  # the deployment's fetch began
    stalls: int = 0  # stall periods in a row without a chunk, while connected

    @property
    def age_s(self) -> float:
        return round(time.monotonic() - self.created, 1)

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
        self.stalls = 0

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


class Fetcher:
    """The FETCHING phase: one job at a time, fed the announcement and chunks the worker routes here.

    A part of the agent owned by its one worker thread; ``reject``, ``give_up`` and ``complete``
    go back to it (a refused artifact; chunks that stopped coming; a finished download to install).

    A fetch that makes no progress for ``transfer.stall_s`` says so in a FETCHING event with a
    reason, once per stall period: the manifest has not come (not on the broker?) or no chunk
    came (the window is asked for again). After ``transfer.stall_tries`` chunk stalls in a row
    while connected, it gives up: the artifact is no longer (completely) on the broker.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        policy: Policy,
        transport: Transport,
        machine: Machine,
        out: Outbox,
        active: Callable[[], Installed | None],
        reject: Callable[[Deployment, str, dict[str, Any]], None],
        complete: Callable[[FetchJob], None],
        give_up: Callable[[Deployment, str, dict[str, Any]], None],
    ) -> None:
        self.cfg, self.policy, self.t, self.machine, self.out = cfg, policy, transport, machine, out
        self.active, self.reject, self.complete, self.give_up = active, reject, complete, give_up
        self.downloads = cfg.state_dir / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.job: FetchJob | None = None
        self._backoff: tuple[str, float] | None = None  # (sha, delay) of the last wait for space

    def start(self, desired: Deployment) -> None:
        """Fetch ``desired`` (its announcement first), giving up any other download."""
        if self.job is not None:
            if self.job.sha == desired.sha256:
                return
            self.cancel()
        self.job = FetchJob(desired)
        self.t.subscribe([topics.artifact_manifest(desired.sha256)])

    def cancel(self, sha: str | None = None, verdict: bool = False) -> None:
        """Give up the download (of ``sha`` only, when given); the partial file stays for a resume.
        With ``verdict`` the caller moves the machine on (REJECTED), else it goes back to IDLE."""
        if self.job is not None and (sha is None or self.job.sha == sha):
            self.job.cancel(self.t)
            self.job = None
            if not verdict:
                self.machine.idle()

    def on_announcement(self, job: FetchJob, payload: bytes) -> None:
        if job.retry_at is not None:
            return  # waiting for disk space: asked for again when the retry is due
        short: tuple[str, dict[str, Any]] | None = None
        try:
            ann = decode(ArtifactAnnouncement, payload, MAX_ANNOUNCEMENT_BYTES)
            if ann.sha256 != job.sha:
                raise MessageError("announcement's sha256 differs from its topic")
            # Size and chunk table were signed with the deployment: nothing is written for others.
            if ann.size != job.desired.size:
                raise IntegrityError(
                    f"announced size {ann.size} differs from the {job.desired.size} bytes the "
                    "deployment signed"
                )
            if ann.table_digest() != job.desired.chunks_sha256:
                raise IntegrityError(
                    "announced chunk table differs from the one the deployment signed"
                )
            problem = ann.table_problem()
            if problem:
                raise MessageError(f"chunk table does not add up: {problem}")
            m = self.policy.check_signed(ann.manifest, ann.signature)
            if (m.name, m.version) != (job.desired.name, job.desired.version):
                raise IntegrityError(
                    f"deployment names {job.desired.name}@{job.desired.version} "
                    f"but the artifact is {m.name}@{m.version}"
                )
            short = self._check_space(ann, m)
            store = None if short is not None else ChunkStore(self.downloads, ann)
        except (EdgefleetError, OSError) as exc:
            if is_disk_full(exc):
                self.wait_for_space(job.desired, f"cannot create the download: {exc}")
            else:
                self.reject(job.desired, str(exc), {})
            return
        if store is None:
            assert short is not None
            self.wait_for_space(job.desired, *short)
            return
        job.ann, job.manifest, job.store = ann, m, store
        self.t.unsubscribe([topics.artifact_manifest(job.sha)])
        job.started = job.last_progress = time.monotonic()
        self.machine.enter(
            Phase.FETCHING,
            job.desired,
            "",
            {"chunks": len(ann.chunks), "size": ann.size, "resumed_chunks": store.resumed_chunks},
        )
        self._continue(job)

    def on_chunk(self, job: FetchJob, index: int, payload: bytes) -> None:
        store = job.store
        assert store is not None
        if index not in job.inflight:
            if 0 <= index < len(store.done) and store.done[index]:
                store.duplicate_chunks += 1
                return
            self.out.bad(topics.artifact_chunk(job.sha, index), "chunk that was not requested")
            return
        try:
            store.write(index, payload)
        except IntegrityError as exc:
            # Ask again (the broker resends the retained chunk): a stray bad message is survived,
            # a corrupt retained chunk rejects the artifact after CHUNK_RETRIES tries.
            tries = job.bad_chunks[index] = job.bad_chunks.get(index, 0) + 1
            if tries >= CHUNK_RETRIES:
                self.reject(job.desired, f"{exc} ({tries} times)", {"chunk": index})
                return
            self.out.bad(topics.artifact_chunk(job.sha, index), str(exc))
            job.retry(self.t, index)
            return
        except OSError as exc:
            if is_disk_full(exc):
                self.wait_for_space(
                    job.desired, f"cannot write the download: {exc}", {"chunk": index}
                )
            else:
                self.reject(job.desired, f"cannot write the download: {exc}", {"chunk": index})
            return
        job.landed(self.t, index, len(payload))
        self._continue(job)

    def _continue(self, job: FetchJob) -> None:
        store = job.store
        assert store is not None
        frac = store.count_done / len(store.done)
        if frac >= job.next_report and not store.complete:
            job.next_report = (int(frac * 10) + 1) / 10
            self.machine.enter(Phase.FETCHING, job.desired, "", {"progress": round(frac, 3)})
            if frac >= 0.5:
                self.machine.pause("FETCHING")
        if store.complete:
            job.finished = time.monotonic()
            self.job = None
            self.complete(job)
        else:
            job.fill_window(self.t, self.cfg.transfer.window)

    def _check_space(
        self, ann: ArtifactAnnouncement, m: Manifest
    ) -> tuple[str, dict[str, Any]] | None:
        """Before anything is written: refuse an artifact over ``transfer.max_artifact_mb``
        (TooLargeError); the reason to wait when the state dir lacks room for it (space.py)."""
        tc = self.cfg.transfer
        check_size(ann.size, tc.max_artifact_mb)
        have = allocated(self.downloads / f"{ann.sha256}.part")
        have += allocated(self.downloads / f"{ann.sha256}.efa")
        return space_short(self.cfg.state_dir, ann.size, m, tc.free_space_margin_mb, have)

    def wait_for_space(
        self, desired: Deployment, reason: str, detail: dict[str, Any] | None = None
    ) -> None:
        """A full disk, or too little room announced: discard the download first (its space is
        what the agent's own state files need next), then fetch it again after a backoff
        (WAITING_SPACE). Not a refusal: nothing is remembered in agent.json."""
        if self.job is not None:
            self.job.cancel(self.t)
        discard_download(self.downloads, desired.sha256)
        tc = self.cfg.transfer
        last = self._backoff
        delay = (
            min(last[1] * 2, tc.disk_retry_max_s)
            if last is not None and last[0] == desired.sha256
            else min(tc.disk_retry_s, tc.disk_retry_max_s)
        )
        self._backoff = (desired.sha256, delay)
        self.job = FetchJob(desired, retry_at=time.monotonic() + delay, deferred=True)
        log.warning("waiting for disk space: %s (again in %.1fs)", reason, delay)
        self.machine.enter(
            Phase.WAITING_SPACE,
            desired,
            f"waiting for disk space: {reason}",
            {**(detail or {}), "waiting": "disk_space", "retry_in_s": round(delay, 3)},
        )

    def pending(self) -> PendingDeployment | None:
        """The deployment being fetched (for status and the state message), or None."""
        job = self.job
        if job is None:
            return None
        d = job.desired
        if job.retry_at is not None:
            waiting = "disk_space"
        elif job.ann is None:
            waiting = "manifest"
        else:
            waiting = "chunks" if job.stalls else ""
        return PendingDeployment(
            name=d.name, version=d.version, sha256=d.sha256, age_s=job.age_s, waiting=waiting
        )

    def tick(self, now: float) -> None:
        job = self.job
        if job is None:
            return
        if job.retry_at is not None:
            if now >= job.retry_at:
                job.retry_at = None  # the retained announcement comes again; its checks run again
                job.last_progress = now
                self.t.subscribe([topics.artifact_manifest(job.sha)])
            return
        stall_s = self.cfg.transfer.stall_s
        if now - job.last_progress <= stall_s:
            return
        sha = job.sha[:16]
        if job.ann is None:
            # Nothing to ask again: the broker delivers the retained manifest on subscribe, and a
            # later publish reaches the subscription. Say so, and keep waiting.
            job.last_progress = now
            self._stuck(
                job,
                f"waiting {job.age_s:.0f} s for the manifest of {sha} (not on the broker?)",
                {"waiting": "manifest"},
            )
            return
        if not job.inflight:
            return
        if self.t.is_connected():  # a broker away is not a missing artifact
            job.stalls += 1
        tries = self.cfg.transfer.stall_tries
        missing = sorted(job.inflight)
        if job.stalls >= tries:
            self.give_up(
                job.desired,
                f"chunks {ranges(missing)} of {sha} not delivered after {job.stalls} tries "
                "(pruned from the broker?)",
                {"chunks": missing[:64], "tries": job.stalls},
            )
            return
        log.info("no chunk for %.0fs; asking again for %d chunks", stall_s, len(missing))
        job.resubscribe(self.t)
        self._stuck(
            job,
            f"no chunk for {stall_s:.0f} s: waiting for chunks {ranges(missing)} of {sha} "
            f"(try {job.stalls + 1} of {tries})",
            {"waiting": "chunks", "chunks": missing[:64], "stalls": job.stalls},
        )

    def _stuck(self, job: FetchJob, reason: str, detail: dict[str, Any]) -> None:
        """A report, not a transition: the machine stays where it is. The retained state is
        published again so it carries the pending deployment's current age."""
        log.warning("%s", reason)
        detail = {**detail, "age_s": job.age_s}
        self.out.event("deployment", "FETCHING", reason, job.desired, detail)
        self.out.publish_state(online=True)


def ranges(indices: list[int]) -> str:
    """Sorted chunk indices as '3..9, 12' (consecutive runs joined)."""
    out: list[str] = []
    start = prev = None
    for i in [*indices, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}..{prev}")
        start = prev = i
    return ", ".join(out)
