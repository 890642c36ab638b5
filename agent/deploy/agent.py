"""The agent: reconciles the active model with the retained desired deployment.

Transport callbacks only enqueue; one worker thread (``step``/``run``) does everything else, so
the state below is touched by one thread. Nothing received can raise out of ``step``: a bad
message becomes a ``bad_message`` event and the active model keeps serving. This module routes
messages and fetches; state and events are in ``state.py``, install/probation/rollback in
``install.py``, commands in ``commands.py`` (``Agent`` inherits them in that order).
"""

from __future__ import annotations

import queue
import threading
import time

from agent.deploy.commands import Commands
from agent.deploy.fetch import FetchJob
from agent.deploy.state import log
from agent.errors import EdgefleetError, IntegrityError
from agent.protocol import topics
from agent.protocol.messages import (
    MAX_ANNOUNCEMENT_BYTES,
    ArtifactAnnouncement,
    Deployment,
    MessageError,
    decode,
)
from agent.serve.local import Arrays
from agent.service import trim_memory
from agent.store.chunks import ChunkStore
from agent.telemetry.reporter import TelemetryReporter
from agent.transport.base import Will

CHUNK_RETRIES = 3
# Bytes waiting in the queue: a flood of large messages is dropped (and counted), not buffered.
QUEUE_MAX_BYTES = 64 * 1024 * 1024


class Agent(Commands):
    """The device agent: ``run`` is its worker loop; tests drive it with ``step``/``drain``."""

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._recover()
        self.t.set_will(Will(topics.device_topic(self.dev, "state"), self._state_payload(online=False)))
        base = [topics.device_topic(self.dev, "deployment"), topics.device_topic(self.dev, "cmd")]
        base += [topics.group_deployment(g) for g in self.cfg.groups]
        self.t.subscribe(base)
        self.t.start(self._enqueue_message, self._enqueue_connect)

    def run(self, stop: threading.Event) -> None:
        self.start()
        trim_memory()
        self.notifier.ready(self.status_line())
        reporter = self.start_telemetry()
        while not stop.is_set():
            self.notifier.watchdog()
            self.step(0.2)
        self.notifier.stopping()
        if reporter is not None:
            reporter.stop()
        self._publish_state(online=False)
        time.sleep(0.2)
        self.t.stop()

    def start_telemetry(self) -> TelemetryReporter | None:
        """The reporter thread ([telemetry]); it reads only ``latency`` and the active model."""
        if not self.cfg.telemetry.enabled:
            return None
        reporter = TelemetryReporter(self.cfg, self.t, self.latency, self._active_model)
        reporter.start()
        return reporter

    def step(self, timeout: float = 0.0) -> bool:
        """Handle one queued item (waiting up to ``timeout``), then timers. True if one was handled."""
        handled = False
        try:
            kind, topic, payload = self.q.get(timeout=timeout) if timeout > 0 else self.q.get_nowait()
        except queue.Empty:
            pass
        else:
            handled = True
            with self._qlock:
                self._queued_bytes -= len(payload)
            try:
                if kind == "connect":
                    self._publish_state(online=True)
                else:
                    self._on_message(topic, payload)
            except Exception as exc:  # a bug, but the agent must keep serving
                log.exception("error handling %s", topic)
                self._bad(topic, f"internal error: {type(exc).__name__}: {exc}")
        try:
            self._tick()
        except Exception as exc:
            log.exception("timer error")
            self._event("info", reason=f"internal error in timers: {type(exc).__name__}: {exc}")
        return handled

    def drain(self, limit: int = 100_000) -> None:
        """Process everything queued (unit tests with the fake transport)."""
        while limit > 0 and self.step(0):
            limit -= 1

    # -- transport callbacks: enqueue only ------------------------------------------------------
    def _enqueue_message(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._qlock:
            if self._queued_bytes + len(payload) > QUEUE_MAX_BYTES:
                self.dropped += 1
                return
            try:
                self.q.put_nowait(("msg", topic, payload))
            except queue.Full:
                self.dropped += 1
                return
            self._queued_bytes += len(payload)

    def _enqueue_connect(self) -> None:
        self.q.put(("connect", "", b""))

    def infer(self, feeds: Arrays) -> Arrays:
        """In-process inference on the active model (timed into ``self.latency``)."""
        return self.local.infer(feeds)

    # -- messages -------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        t = topics.parse(topic)
        if t is None:
            self._bad(topic, "not an edgefleet topic")
        elif t.kind == "device_deployment" and t.device == self.dev:
            self.desired_device = self._deployment(topic, payload, self.desired_device)
            self._reconcile()
        elif t.kind == "group_deployment" and t.group in self.cfg.groups:
            assert t.group is not None
            self.desired_groups[t.group] = self._deployment(topic, payload, self.desired_groups.get(t.group))
            self._reconcile()
        elif t.kind == "manifest":
            job = self.job
            if job is None or t.sha256 != job.sha or job.ann is not None:
                self._bad(topic, "manifest for an artifact that is not being fetched")
            else:
                self._on_announcement(job, payload)
        elif t.kind == "chunk":
            job = self.job
            if job is None or job.store is None or t.sha256 != job.sha or t.index is None:
                self._bad(topic, "chunk for an artifact that is not being fetched")
            else:
                self._on_chunk(job, t.index, payload)
        elif t.kind == "cmd" and t.device == self.dev:
            self._on_command(topic, payload)
        else:
            self._bad(topic, "a topic this agent does not handle")

    def _deployment(self, topic: str, payload: bytes, old: Deployment | None) -> Deployment | None:
        if not payload:
            return None  # retained deployment cleared
        try:
            dep = decode(Deployment, payload)
        except MessageError as exc:
            self._bad(topic, str(exc))
            return old
        if dep.profile is not None and dep.profile != self.cfg.profile:
            self._event("deployment", "REJECTED", f"deployment is for profile '{dep.profile}', "
                        f"this device is '{self.cfg.profile}'", dep)
            return old
        rej = self.rejected.get(dep.sha256)
        if rej is not None and dep.deployed_at and rej.get("deployed_at") != dep.deployed_at:
            del self.rejected[dep.sha256]  # a new deployment of a rejected artifact tries again
            self._save_agent()
        return dep

    def _reconcile(self) -> None:
        desired = self._desired()
        if self.probation is not None:
            return  # picked up again when probation ends
        if desired is None or (self.active is not None and self.active.sha256 == desired.sha256) \
                or desired.sha256 in self.rejected:
            if self.job is not None:
                self.job.cancel(self.t)
                self.job = None
            return
        if self.job is not None:
            if self.job.sha == desired.sha256:
                return
            self.job.cancel(self.t)
        self.job = FetchJob(desired)
        self.t.subscribe([topics.artifact_manifest(desired.sha256)])

    def _on_announcement(self, job: FetchJob, payload: bytes) -> None:
        try:
            ann = decode(ArtifactAnnouncement, payload, MAX_ANNOUNCEMENT_BYTES)
            if ann.sha256 != job.sha:
                raise MessageError("announcement's sha256 differs from its topic")
            problem = ann.table_problem()
            if problem:
                raise MessageError(f"chunk table does not add up: {problem}")
            m = self.policy.check_signed(ann.manifest, ann.signature, self.active)
            if (m.name, m.version) != (job.desired.name, job.desired.version):
                raise IntegrityError(f"deployment names {job.desired.name}@{job.desired.version} "
                                     f"but the artifact is {m.name}@{m.version}")
            store = ChunkStore(self.downloads, ann)
        except (EdgefleetError, OSError) as exc:
            self._reject(job.desired, str(exc))
            return
        job.ann, job.manifest, job.store = ann, m, store
        self.t.unsubscribe([topics.artifact_manifest(job.sha)])
        job.started = job.last_progress = time.monotonic()
        self._event("deployment", "FETCHING", "", job.desired,
                    {"chunks": len(ann.chunks), "size": ann.size, "resumed_chunks": store.resumed_chunks})
        self._continue_fetch(job)

    def _on_chunk(self, job: FetchJob, index: int, payload: bytes) -> None:
        store = job.store
        assert store is not None
        if index not in job.inflight:
            if 0 <= index < len(store.done) and store.done[index]:
                store.duplicate_chunks += 1
                return
            self._bad(topics.artifact_chunk(job.sha, index), "chunk that was not requested")
            return
        try:
            store.write(index, payload)
        except IntegrityError as exc:
            # Ask again (the broker resends the retained chunk): a stray bad message is survived,
            # a corrupt retained chunk rejects the artifact after CHUNK_RETRIES tries.
            tries = job.bad_chunks[index] = job.bad_chunks.get(index, 0) + 1
            if tries >= CHUNK_RETRIES:
                self._reject(job.desired, f"{exc} ({tries} times)", detail={"chunk": index})
                return
            self._bad(topics.artifact_chunk(job.sha, index), str(exc))
            job.retry(self.t, index)
            return
        except OSError as exc:
            self._reject(job.desired, f"cannot write the download: {exc}", detail={"chunk": index})
            return
        job.landed(self.t, index, len(payload))
        self._continue_fetch(job)

    def _continue_fetch(self, job: FetchJob) -> None:
        store = job.store
        assert store is not None
        frac = store.count_done / len(store.done)
        if frac >= job.next_report and not store.complete:
            job.next_report = (int(frac * 10) + 1) / 10
            self._event("deployment", "FETCHING", "", job.desired, {"progress": round(frac, 3)})
            if frac >= 0.5:
                self._pause("FETCHING")
        if store.complete:
            job.finished = time.monotonic()
            self.job = None
            self._install(job)
        else:
            job.fill_window(self.t, self.cfg.transfer.window)

    def _tick(self) -> None:
        now = time.monotonic()
        job = self.job
        if job is not None and job.inflight and now - job.last_progress > self.cfg.transfer.stall_s:
            log.info("no chunk for %.0fs; asking again for %d chunks", self.cfg.transfer.stall_s, len(job.inflight))
            job.resubscribe(self.t)
        self._tick_probation(now)
