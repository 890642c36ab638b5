"""The agent: reconciles the active model with the retained desired deployment.

Transport callbacks only enqueue; one worker thread (``step``/``run``) does everything else, so
the state below is touched by one thread. Nothing received can raise out of ``step``: a bad
message becomes a ``bad_message`` event and the active model keeps serving.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.deploy import selftest
from agent.deploy.commands import command_id, handle_command
from agent.deploy.fetch import FetchJob
from agent.deploy.policy import Policy
from agent.errors import EdgefleetError, IntegrityError
from agent.protocol import topics
from agent.protocol.artifact import verify_artifact
from agent.protocol.golden import GoldenSet
from agent.protocol.messages import (
    MAX_ANNOUNCEMENT_BYTES,
    ActiveModel,
    ArtifactAnnouncement,
    Command,
    CommandResult,
    Deployment,
    DeployState,
    Event,
    MessageError,
    StateMessage,
    decode,
    encode,
)
from agent.runtime import InferenceSession
from agent.serve.holder import Loaded, SessionHolder
from agent.serve.local import Arrays, LocalModel
from agent.service import Notifier, trim_memory
from agent.store.chunks import ChunkStore, discard_download
from agent.store.fsutil import read_json, remove, write_json
from agent.store.versions import Installed, VersionStore
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.thermal import ThermalReader
from agent.transport.base import Transport, Will

log = logging.getLogger(__name__)

# Test hook (documented in docs/protocol.md): sleep at this deployment state so a test can
# SIGKILL the process there. FETCHING pauses once half the chunks are on disk.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
QUEUE_MAX = 10_000
CHUNK_RETRIES = 3
SEQ_SAVE_EVERY = 64
# Bytes waiting in the queue: a flood of large messages is dropped (and counted), not buffered.
QUEUE_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class Probation:
    inst: Installed
    until: float
    next_check: float


class Agent:
    def __init__(self, cfg: AgentConfig, policy: Policy, transport: Transport) -> None:
        self.cfg, self.policy, self.t = cfg, policy, transport
        self.dev = cfg.device_id
        self.q: queue.Queue[tuple[str, str, bytes]] = queue.Queue(QUEUE_MAX)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.downloads = cfg.state_dir / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.versions = VersionStore(cfg.state_dir, cfg.keep_versions)
        self.install_path = cfg.state_dir / "install.json"
        self.agent_path = cfg.state_dir / "agent.json"
        doc = read_json(self.agent_path)
        doc = doc if isinstance(doc, dict) else {}
        # seq is saved every SEQ_SAVE_EVERY messages; starting that far ahead keeps it increasing
        saved = doc.get("seq", 0)
        self.seq = (saved if isinstance(saved, int) else 0) + SEQ_SAVE_EVERY
        rej = doc.get("rejected", {})
        self.rejected: dict[str, dict[str, str]] = rej if isinstance(rej, dict) else {}
        self.desired_device: Deployment | None = None
        self.desired_groups: dict[str, Deployment | None] = {}
        self.job: FetchJob | None = None
        self.active: Installed | None = None
        self.session: InferenceSession | None = None
        self.golden: GoldenSet | None = None
        self.probation: Probation | None = None
        self.dropped = 0
        # Every inference (serving, commands) records here; the telemetry reporter reads windows.
        self.latency = LatencyRecorder()
        # Requests (HTTP endpoint, LocalModel) use the model through the holder, never self.session:
        # a swap goes through it, so a request finishes on the model it started with.
        self.holder = SessionHolder()
        self.local = LocalModel(self.holder, self.latency)
        # systemd sd_notify (READY, WATCHDOG, STATUS); sends nothing outside systemd
        self.notifier = Notifier(None)
        self.thermal = ThermalReader(cfg.telemetry.sysfs_root)  # for the benchmark command
        self._queued_bytes = 0
        self._qlock = threading.Lock()

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

    # -- publishing -----------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self.seq += 1
        if self.seq % SEQ_SAVE_EVERY == 0:  # a rename per message would slow a transfer down
            self._save_agent()
        return self.seq

    def _save_agent(self) -> None:
        write_json(self.agent_path, {"seq": self.seq, "rejected": self.rejected}, durable=False)

    def _active_model(self) -> ActiveModel | None:
        a = self.active
        return None if a is None else ActiveModel(name=a.manifest.name, version=a.manifest.version, sha256=a.sha256)

    def _state_payload(self, online: bool) -> bytes:
        return encode(StateMessage(device=self.dev, online=online, agent_version=__version__,
                                   profile=self.cfg.profile, groups=list(self.cfg.groups),
                                   active=self._active_model(), seq=self._next_seq(), ts=time.time()))

    def _publish_state(self, online: bool) -> None:
        self.t.publish(topics.device_topic(self.dev, "state"), self._state_payload(online), retain=True)

    def _event(self, kind: str, state: DeployState | None = None, reason: str = "",
               dep: Deployment | Installed | None = None, detail: dict[str, Any] | None = None) -> None:
        name = version = sha = None
        if isinstance(dep, Deployment):
            name, version, sha = dep.name, dep.version, dep.sha256
        elif isinstance(dep, Installed):
            name, version, sha = dep.manifest.name, dep.manifest.version, dep.sha256
        ev = Event(device=self.dev, seq=self._next_seq(), ts=time.time(), kind=kind,  # type: ignore[arg-type]
                   state=state, name=name, version=version, sha256=sha, reason=reason[:2000],
                   detail=detail or {})
        log.log(logging.WARNING if reason else logging.INFO, "event %s %s %s@%s %s", kind,
                state or "", name, version, reason)
        if kind == "deployment" and state in ("FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST"):
            pct = (detail or {}).get("progress")
            what = {"FETCHING": "fetching", "VERIFIED": "verified", "UNPACKED": "unpacked",
                    "SELF_TEST": "self-test"}[state]
            self.notifier.status(f"{what} {name} {version}" + (f" {pct:.0%}" if isinstance(pct, float) else "")
                                 + f" ({self.status_line()})")
        elif kind == "deployment":
            self.notifier.status(self.status_line())
        self.t.publish(topics.device_topic(self.dev, "events"), encode(ev))

    def _bad(self, topic: str, reason: str) -> None:
        self._event("bad_message", reason=reason, detail={"topic": topic[:200]})

    def _pause(self, state: str) -> None:
        if os.environ.get(PAUSE_ENV) == state:
            log.warning("%s=%s: pausing (test hook)", PAUSE_ENV, state)
            time.sleep(600)

    # -- recovery after a restart ---------------------------------------------------------------
    def _recover(self) -> None:
        self.versions.clean_partial()
        doc = read_json(self.install_path)
        active = self.versions.active()
        if active is not None:
            try:
                self._load_active(active)
            except (EdgefleetError, OSError, ValueError) as exc:
                self.active = active
                self._rollback(f"active model does not load after restart: {exc}")
                return
        if isinstance(doc, dict) and active is not None and doc.get("dir") == active.dir.name \
                and doc.get("state") in ("ACTIVATING", "PROBATION"):
            self._start_probation(active)
            self._event("info", "ACTIVE", "restarted during probation; probation starts again", active)
        elif doc is not None:
            remove(self.install_path)  # an install interrupted before activation restarts from the download

    def _load_active(self, inst: Installed) -> None:
        session = selftest.load(inst, self.cfg.threads, self.policy.providers)
        golden = selftest.golden_of(inst)
        try:
            session.infer({k: v[:1] for k, v in golden.inputs.items()})  # warm-up before serving
        except Exception as exc:  # a runtime's own error types
            session.close()
            raise ValueError(f"warm-up inference failed: {type(exc).__name__}: {exc}") from None
        self._set_active(inst, session, golden)

    def _set_active(self, inst: Installed | None, session: InferenceSession | None,
                    golden: GoldenSet | None) -> None:
        """Swap the served model through the holder: the old session closes after its last request."""
        self.active, self.session, self.golden = inst, session, golden
        m = None if inst is None else inst.manifest
        self.holder.swap(None if m is None or inst is None or session is None else
                         Loaded(m.name, m.version, inst.sha256, m.runtime, session))
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """What the agent serves, for systemd's STATUS=."""
        a = self.active
        return f"serving {a.manifest.name} {a.manifest.version}" if a else "no model active"

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

    def _desired(self) -> Deployment | None:
        if self.desired_device is not None:
            return self.desired_device
        for g in self.cfg.groups:
            if self.desired_groups.get(g) is not None:
                return self.desired_groups[g]
        return None

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

    def _reject(self, dep: Deployment, reason: str, state: DeployState = "REJECTED",
                detail: dict[str, Any] | None = None) -> None:
        self.rejected[dep.sha256] = {"reason": reason, "deployed_at": dep.deployed_at}
        self._save_agent()
        if self.job is not None and self.job.sha == dep.sha256:
            self.job.cancel(self.t)
            self.job = None
        discard_download(self.downloads, dep.sha256)
        self._event("deployment", state, reason, dep, detail)

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

    # -- install --------------------------------------------------------------------------------
    def _install(self, job: FetchJob) -> None:
        dep, store = job.desired, job.store
        assert store is not None
        try:
            path = store.finish()
            va = verify_artifact(path, list(self.policy.keys))
            if va.sha256 != dep.sha256:
                raise IntegrityError("artifact sha256 differs from the deployment")
            if job.manifest is not None and va.manifest != job.manifest:
                raise IntegrityError("artifact's manifest differs from the announced one")
            self.policy.check(va.manifest, self.active)
        except (EdgefleetError, OSError) as exc:
            self._reject(dep, str(exc))
            return
        self._event("deployment", "VERIFIED", "", dep, {"key_id": va.key_id, "fetch": job.stats()})
        self._pause("VERIFIED")
        try:
            inst = self.versions.unpack(va)
        except (EdgefleetError, OSError) as exc:
            self._reject(dep, f"unpack failed: {exc}")
            return
        self._event("deployment", "UNPACKED", "", dep, {"dir": inst.dir.name})
        self._pause("UNPACKED")
        self._event("deployment", "SELF_TEST", "", dep)
        self._pause("SELF_TEST")
        try:
            session = selftest.load(inst, self.cfg.threads, self.policy.providers)
        except (EdgefleetError, OSError, ValueError) as exc:
            self._failed_candidate(dep, inst, f"model does not load: {exc}")
            return
        current = None if self.session is None or self.golden is None else (self.session, self.golden)
        result = selftest.check_candidate(
            session, inst, self.cfg.install.bench_runs, self.policy.max_p95_ms,
            self.policy.max_regression_pct, self.cfg.install.p95_slack_ms, current,
            tick=self.notifier.watchdog)
        if not result.ok:
            session.close()
            self._failed_candidate(dep, inst, result.reason, result.detail)
            return
        previous = self.active
        write_json(self.install_path, {"sha256": dep.sha256, "dir": inst.dir.name, "state": "ACTIVATING",
                                       "previous": previous.dir.name if previous else None})
        self.versions.activate(inst)
        self._set_active(inst, session, selftest.golden_of(inst))
        write_json(self.install_path, {"sha256": dep.sha256, "dir": inst.dir.name, "state": "PROBATION",
                                       "previous": previous.dir.name if previous else None})
        discard_download(self.downloads, dep.sha256)
        self._event("deployment", "ACTIVE", "", inst, {**result.detail,
                    "previous": previous.label if previous else None})
        self._publish_state(online=True)
        self._start_probation(inst)
        self._pause("ACTIVE")

    def _failed_candidate(self, dep: Deployment, inst: Installed, reason: str,
                          detail: dict[str, Any] | None = None) -> None:
        """A failure before activation: the previous model never stopped being active."""
        self.versions.forget(inst)
        remove(self.install_path)
        kept = self.active.label if self.active else None
        self._reject(dep, reason, "ROLLED_BACK", {**(detail or {}), "active": kept})

    def _start_probation(self, inst: Installed) -> None:
        now = time.monotonic()
        self.probation = Probation(inst, now + self.cfg.install.probation_s,
                                   now + min(self.cfg.install.probation_interval_s, self.cfg.install.probation_s))

    def _tick(self) -> None:
        now = time.monotonic()
        job = self.job
        if job is not None and job.inflight and now - job.last_progress > self.cfg.transfer.stall_s:
            log.info("no chunk for %.0fs; asking again for %d chunks", self.cfg.transfer.stall_s, len(job.inflight))
            job.resubscribe(self.t)
        p = self.probation
        if p is None:
            return
        if now >= p.next_check:
            p.next_check = now + self.cfg.install.probation_interval_s
            problem = self._probe()
            if problem is not None:
                self._rollback(f"probation failed: {problem}")
                return
        if now >= p.until:
            self.probation = None
            remove(self.install_path)
            removed = self.versions.prune()
            self._clean_downloads()
            self._event("deployment", "HEALTHY", "", p.inst, {"pruned": removed})
            self._reconcile()

    def _clean_downloads(self) -> None:
        """Drop downloads of artifacts no longer wanted (a superseded deployment's partial file)."""
        desired = self._desired()
        keep = {d.sha256 for d in (desired,) if d is not None}
        if self.job is not None:
            keep.add(self.job.sha)
        for f in self.downloads.iterdir():
            if f.name.split(".")[0] not in keep:
                remove(f)

    def _probe(self) -> str | None:
        if self.session is None or self.golden is None or self.active is None:
            return "no model loaded"
        return selftest.golden_check(self.session, self.active, self.golden)

    def _rollback(self, reason: str, by_command: bool = False, target: Installed | None = None) -> bool:
        """Switch back to ``target`` or the previous version (or to none); mark the failed one rejected."""
        failed = self.active
        prev = target or self.versions.previous()
        session = golden = None
        while prev is not None:
            try:
                session, golden = selftest.load(prev, self.cfg.threads, self.policy.providers), selftest.golden_of(prev)
                break
            except (EdgefleetError, OSError, ValueError) as exc:
                log.warning("previous version %s does not load: %s", prev.label, exc)
                self.versions.forget(prev)
                prev = None if target is not None else self.versions.previous()
        if by_command and prev is None:
            return False
        if prev is not None:
            self.versions.activate(prev)
        else:
            self.versions.deactivate()
        self._set_active(prev, session, golden)
        self.probation = None
        remove(self.install_path)
        if failed is not None:
            self.rejected[failed.sha256] = {"reason": reason, "deployed_at": self._deployed_at(failed.sha256)}
            self._save_agent()
            self.versions.forget(failed)
        self._event("deployment", "ROLLED_BACK", reason, failed,
                    {"active": prev.label if prev else None})
        self._publish_state(online=True)
        return True

    def _deployed_at(self, sha: str) -> str:
        for d in (self.desired_device, *self.desired_groups.values()):
            if d is not None and d.sha256 == sha:
                return d.deployed_at
        return ""

    # -- commands ---------------------------------------------------------------------------------
    def _on_command(self, topic: str, payload: bytes) -> None:
        result_topic = topics.device_topic(self.dev, "cmd/result")
        try:
            cmd = decode(Command, payload)
        except MessageError as exc:
            self._bad(topic, str(exc))
            cmd_id = command_id(payload)
            if cmd_id is not None:  # the sender waits for this id: tell it why
                self.t.publish(result_topic, encode(CommandResult(id=cmd_id, ok=False, reason=str(exc))))
            return
        try:
            res = handle_command(self, cmd)
        except Exception as exc:  # a bug: answer, keep serving
            log.exception("command %s failed", cmd.op)
            res = CommandResult(id=cmd.id, ok=False, reason=f"internal error: {type(exc).__name__}: {exc}")
        self.t.publish(result_topic, encode(res))

    def rollback_command(self, cmd_id: str, version: str | None = None) -> tuple[bool, str]:
        """Roll back to the kept ``version`` (default: the previous one); (ok, reason)."""
        target = None
        a = self.active
        if version is not None:
            if a is not None and version in (a.manifest.version, a.label, a.dir.name):
                return False, f"{a.label} is already the active version"
            target = self.versions.find(version)
            if target is None:
                kept = ", ".join(i.label for i in self.versions.kept()) or "none"
                return False, f"version {version} is not kept on this device (kept: {kept})"
        if self._rollback(f"rollback requested by command {cmd_id}", by_command=True, target=target):
            return True, ""
        if target is not None:
            return False, f"{target.label} does not load; it was removed"
        return False, "no previous version to roll back to"

    def deploy_command(self, dep: Deployment) -> None:
        self.rejected.pop(dep.sha256, None)
        self.desired_device = dep
        self._reconcile()

    def publish_state(self) -> None:
        self._publish_state(online=True)

    def status(self) -> dict[str, Any]:
        job = self.job
        return {
            "device": self.dev,
            "active": a.model_dump() if (a := self._active_model()) else None,
            "probation": self.probation is not None,
            "fetching": None if job is None or job.store is None else
            {"sha256": job.sha, "done": job.store.count_done, "chunks": len(job.store.done)},
            "dropped_messages": self.dropped,
            "kept": [i.label for i in self.versions.kept()],
        }

