"""The agent: reconciles the active model with the retained desired deployment.

Transport callbacks only enqueue (``Inbox``, inbox.py); one worker thread (``step``/``run``)
does everything else, so the parts below are touched by one thread. Nothing received can raise
out of ``step``: a bad message becomes a ``bad_message`` event and the active model keeps serving.

The agent is the worker and owns its parts: ``Machine`` (machine.py: the deploy phases, their
transitions and install.json), ``Outbox`` (outbox.py: state, events, seq), ``Fetcher``
(fetch.py: FETCHING), ``Installer`` (install.py: VERIFIED to HEALTHY, probation, rollback,
restart), ``Desired`` (desired.py: the signed deployments held, the one that wins) and the
operator commands (commands.py). This module routes messages to them and decides what to fetch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from agent.config import AgentConfig
from agent.deploy import commands, selftest
from agent.deploy.desired import Desired
from agent.deploy.fetch import Fetcher, FetchJob
from agent.deploy.inbox import Inbox
from agent.deploy.install import Installer, Probation
from agent.deploy.machine import AgentFile, Machine, Phase
from agent.deploy.outbox import Outbox, log
from agent.deploy.policy import Policy
from agent.monitor.capture import Capture, SamplePublisher
from agent.monitor.monitor import Monitor
from agent.protocol import topics
from agent.protocol.messages import Deployment
from agent.protocol.trust import TrustError
from agent.runtime import InferenceSession
from agent.serve.holder import SessionHolder
from agent.serve.local import Arrays, LocalModel
from agent.service import Notifier, trim_memory
from agent.store.chunks import discard_download
from agent.store.fsutil import remove
from agent.store.versions import Installed, VersionStore
from agent.telemetry.generation import GenRecorder
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.power import PowerReader
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.thermal import ThermalReader
from agent.transport.base import Transport, Will


class Agent:
    """The device agent: ``run`` is its worker loop; tests drive it with ``step``/``drain``."""

    def __init__(self, cfg: AgentConfig, policy: Policy, transport: Transport) -> None:
        self.cfg, self.policy, self.t = cfg, policy, transport
        self.dev = cfg.device_id
        self.inbox = Inbox(self.dev, cfg.commands, transport)
        self.bench_budget = commands.BenchBudget(cfg.commands)
        self.bench_stats = commands.BenchStats()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.downloads = cfg.state_dir / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.file = AgentFile(cfg.state_dir / "agent.json")
        self.rejected = self.file.rejected
        # Artifacts given up because their chunks stopped coming (sha -> deployed_at): in memory
        # only, not refusals. A new deployment, a reconnect or a restart tries them again.
        self.missing: dict[str, str] = {}
        # Every served inference (endpoint, LocalModel) records here; the telemetry reporter reads
        # windows. A benchmark command's runs do not: they are not traffic.
        self.latency = LatencyRecorder()
        # Text generation on the endpoint (tokens/s, TTFT, queue), read by the reporter likewise.
        self.generation = GenRecorder()
        # Requests (HTTP endpoint, LocalModel) use the model through the holder, never a session:
        # a swap goes through it, so a request finishes on the model it started with.
        self.holder = SessionHolder()
        self.capture = Capture(cfg)  # feedback capture, off unless enabled ([capture], deployment)
        self.local = LocalModel(self.holder, self.latency, self.capture)
        # Drift episode events from the telemetry thread (deque: appends and pops are atomic).
        self.drift_events: deque[dict[str, Any]] = deque(maxlen=64)
        # For the benchmark command: thermal state and energy before and after.
        self.thermal = ThermalReader(cfg.telemetry.sysfs_root)
        self.power = PowerReader(cfg.telemetry.sysfs_root)
        self.out = Outbox(cfg, policy, transport, self.file, lambda: self.installer.active)
        self.machine = Machine(cfg.state_dir, self.out.deployment)
        self.desired = Desired(cfg, policy, self.out, self.file)
        self.installer = Installer(cfg, policy, self.machine, self.out, self.holder, self)
        self.fetcher = Fetcher(
            cfg,
            policy,
            transport,
            self.machine,
            self.out,
            lambda: self.installer.active,
            lambda dep, reason, detail: self.reject(dep, reason, detail=detail or None),
            self.installer.install,
            self.give_up,
        )
        self.out.pending = self.fetcher.pending

    # -- what the parts hold, read by commands, telemetry and tests ----------------------------------
    @property
    def active(self) -> Installed | None:
        return self.installer.active

    @property
    def session(self) -> InferenceSession | None:
        return self.installer.session

    @property
    def golden(self) -> selftest.AnyGolden | None:
        return self.installer.golden

    @property
    def probation(self) -> Probation | None:
        return self.installer.probation

    @property
    def versions(self) -> VersionStore:
        return self.installer.versions

    @property
    def job(self) -> FetchJob | None:
        return self.fetcher.job

    @property
    def dropped(self) -> int:
        return self.inbox.dropped

    @property
    def pending_commands(self) -> int:
        return self.inbox.pending_commands

    @property
    def refused_busy(self) -> int:
        return self.inbox.refused_busy

    @property
    def notifier(self) -> Notifier:
        return self.out.notifier

    @notifier.setter
    def notifier(self, n: Notifier) -> None:
        self.out.notifier = n

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.installer.recover()
        self.installer.enforce_trust()
        self.t.set_will(
            Will(topics.device_topic(self.dev, "state"), self.out.state_payload(online=False))
        )
        base = [
            topics.trust(),
            topics.device_topic(self.dev, "deployment"),
            topics.device_topic(self.dev, "cmd"),
        ]
        base += [topics.group_deployment(g) for g in self.cfg.groups]
        self.t.subscribe(base)
        self.t.start(self.inbox.put_message, self.inbox.put_connect)

    def run(self, stop: threading.Event) -> None:
        self.start()
        trim_memory()
        self.notifier.ready(self.status_line())
        reporter, samples = self.start_telemetry(), SamplePublisher(self.capture, self.t)
        samples.start()
        while not stop.is_set():
            self.notifier.watchdog()
            self.step(0.2)
        self.notifier.stopping()
        if reporter is not None:
            reporter.stop()
        samples.stop()
        self.out.publish_state(online=False)
        time.sleep(0.2)
        self.t.stop()

    def start_telemetry(self) -> TelemetryReporter | None:
        """The reporter thread ([telemetry]); it reads only ``latency`` and the active model."""
        if not self.cfg.telemetry.enabled:
            return None
        reporter = TelemetryReporter(
            self.cfg,
            self.t,
            self.latency,
            self.out.active_model,
            monitor=self.active_monitor,
            drift_event=self.drift_events.append,
            capture=self.capture.window,
            generation=self.generation.window,
        )
        reporter.start()
        return reporter

    def active_monitor(self) -> Monitor | None:
        cur = self.holder.current
        return None if cur is None else cur.monitor

    def publish_drift_events(self) -> None:
        """Drift episode events queued by the telemetry thread, sent on the worker's sequence."""
        while self.drift_events:
            ev = self.drift_events.popleft()
            self.out.event("drift", reason=ev["reason"], subject=self.active, detail=ev["detail"])

    def step(self, timeout: float = 0.0) -> bool:
        """Handle one queued item (waiting up to ``timeout``), then timers. True if one was handled."""
        self.inbox.answer_busy()
        self.publish_drift_events()
        item = self.inbox.get(timeout)
        if item is not None:
            kind, topic, payload = item
            try:
                if kind == "connect":
                    self.out.publish_state(online=True)
                    if self.missing:  # the broker may hold them again (a re-publish)
                        self.missing.clear()
                        self.reconcile()
                else:
                    self._on_message(topic, payload)
            except Exception as exc:  # a bug, but the agent must keep serving
                log.exception("error handling %s", topic)
                self.out.bad(topic, f"internal error: {type(exc).__name__}: {exc}")
        try:
            now = time.monotonic()
            self.fetcher.tick(now)
            self.installer.tick(now)
        except Exception as exc:
            log.exception("timer error")
            self.out.event("info", reason=f"internal error in timers: {type(exc).__name__}: {exc}")
        return item is not None

    def drain(self, limit: int = 100_000) -> None:
        """Process everything queued (unit tests with the fake transport)."""
        while limit > 0 and self.step(0):
            limit -= 1

    def bench_tick(self, ms: float) -> None:
        """Called after every run of a benchmark command: commands refused meanwhile get their
        answer without waiting for the benchmark to end."""
        self.inbox.answer_busy()

    def infer(self, feeds: Arrays) -> Arrays:
        """In-process inference on the active model (timed into ``self.latency``)."""
        return self.local.infer(feeds)

    # -- messages -------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        t = topics.parse(topic)
        job = self.fetcher.job
        if t is None:
            self.out.bad(topic, "not an edgefleet topic")
        elif t.kind == "trust":
            self._on_trust(topic, payload)
        elif t.kind == "device_deployment" and t.device == self.dev:
            self.desired.on_device(topic, payload)
            self.reconcile()
        elif t.kind == "group_deployment" and t.group in self.cfg.groups:
            assert t.group is not None
            self.desired.on_group(t.group, topic, payload)
            self.reconcile()
        elif t.kind == "manifest":
            if job is None or t.sha256 != job.sha or job.ann is not None:
                self.out.bad(topic, "manifest for an artifact that is not being fetched")
            else:
                self.fetcher.on_announcement(job, payload)
        elif t.kind == "chunk":
            if job is not None and job.deferred and job.store is None and t.sha256 == job.sha:
                pass  # sent before the download was discarded for disk space
            elif job is None or job.store is None or t.sha256 != job.sha or t.index is None:
                self.out.bad(topic, "chunk for an artifact that is not being fetched")
            else:
                self.fetcher.on_chunk(job, t.index, payload)
        elif t.kind == "cmd" and t.device == self.dev:
            commands.on_command(self, topic, payload)
        else:
            self.out.bad(topic, "a topic this agent does not handle")

    # -- trust -------------------------------------------------------------------------------------
    def _on_trust(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained document changes nothing: the device keeps the one it holds
        try:
            changed = self.policy.trust.update(payload)
        except TrustError as exc:
            self.out.bad(topic, str(exc))
            return
        if changed:
            doc = self.policy.trust.doc
            assert doc is not None
            self.out.event(
                "info",
                reason=f"trust document v{doc.version} accepted",
                detail={
                    "version": doc.version,
                    "expires": doc.expires,
                    "revoked": list(doc.revoked),
                },
            )
            self.installer.enforce_trust()
            self.reconcile()

    def allowed(self, inst: Installed) -> str | None:
        """Why ``inst`` may not serve here (its key revoked, below its line's floor), or None."""
        return self.policy.trust.revoked(inst.key_id) or self.policy.lines.run_problem(
            inst.manifest
        )

    # -- desired deployment, rejections -----------------------------------------------------------
    def reconcile(self) -> None:
        """Start, keep or give up the download the desired deployment needs."""
        desired = self.desired.current()
        self.capture.deployment(desired)
        if self.installer.probation is not None:
            return  # picked up again when probation ends
        active = self.installer.active
        if (
            desired is None
            or (active is not None and active.sha256 == desired.sha256)
            or desired.sha256 in self.rejected
            or self.missing.get(desired.sha256) == desired.deployed_at
        ):
            self.fetcher.cancel()
            return
        self.fetcher.start(desired)

    def reject(
        self,
        dep: Deployment,
        reason: str,
        phase: Phase = Phase.REJECTED,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """The attempt at ``dep`` ends in ``phase`` (REJECTED or ROLLED_BACK): remembered, not retried.

        The download goes first: on a full disk its space is what saving agent.json needs."""
        self.rejected[dep.sha256] = {"reason": reason, "deployed_at": dep.deployed_at}
        self.fetcher.cancel(dep.sha256, verdict=True)
        discard_download(self.downloads, dep.sha256)
        self.file.save()
        self.machine.enter(phase, dep, reason, detail)

    def give_up(self, dep: Deployment, reason: str, detail: dict[str, Any]) -> None:
        """The chunks of ``dep`` stopped coming (pruned from the broker?): REJECTED with the
        reason, the partial download discarded, the active model serving on. Not remembered in
        agent.json: a new deployment (a new deployed_at), a reconnect or a restart fetches it
        again, so a re-publish and re-deploy installs it."""
        self.missing[dep.sha256] = dep.deployed_at
        self.fetcher.cancel(dep.sha256, verdict=True)
        discard_download(self.downloads, dep.sha256)
        self.machine.enter(Phase.REJECTED, dep, reason, detail)
        self.out.publish_state(online=True)

    def wait_for_space(
        self, dep: Deployment, reason: str, detail: dict[str, Any] | None = None
    ) -> None:
        """A full disk during the install: fetched again once there is room (not a refusal)."""
        self.fetcher.wait_for_space(dep, reason, detail)

    def mark_rejected(self, sha: str, reason: str) -> None:
        """A rolled-back artifact is not fetched again for the deployment that named it."""
        self.rejected[sha] = {"reason": reason, "deployed_at": self.desired.deployed_at(sha)}
        self.file.save()

    def settled(self) -> None:
        """Probation ended HEALTHY: drop downloads no longer wanted, then reconcile again."""
        desired = self.desired.current()
        keep = {d.sha256 for d in (desired,) if d is not None}
        if self.fetcher.job is not None:
            keep.add(self.fetcher.job.sha)
        for f in self.downloads.iterdir():
            if f.name.split(".")[0] not in keep:
                remove(f)
        self.reconcile()

    # -- what commands and tests call ---------------------------------------------------------------
    def rollback_command(self, cmd_id: str, version: str | None = None) -> tuple[bool, str]:
        return commands.rollback(self, cmd_id, version)

    def deploy_command(self, dep: Deployment) -> None:
        self.rejected.pop(dep.sha256, None)
        self.missing.pop(dep.sha256, None)
        self.desired.device = dep
        self.reconcile()

    def publish_state(self) -> None:
        self.out.publish_state(online=True)

    def status(self) -> dict[str, Any]:
        return commands.status(self)

    def status_line(self) -> str:
        return self.out.status_line()
