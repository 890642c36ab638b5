"""Install, activation, probation and rollback: the machine's phases once an artifact is on disk.

``Installer`` is a part of the agent owned by its one worker thread. It owns what serves (the
active version, its session and golden set, the version store) and moves the deploy machine
from VERIFIED to HEALTHY. A failure before activation keeps the previous model serving
(ROLLED_BACK, or REJECTED for an artifact this device refuses); one during probation switches back.
An active model the trust document no longer allows (revoked key, raised floor) is taken off too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.deploy import selftest
from agent.deploy.fetch import FetchJob
from agent.deploy.machine import Machine, Phase
from agent.deploy.outbox import Outbox, log
from agent.deploy.policy import Policy
from agent.errors import EdgefleetError, IntegrityError, RuntimeTooOldError
from agent.monitor.monitor import Monitor
from agent.protocol.artifact import verify_artifact
from agent.protocol.messages import Deployment
from agent.runtime import InferenceSession
from agent.serve.holder import Loaded, SessionHolder
from agent.store.chunks import discard_download
from agent.store.space import is_disk_full
from agent.store.versions import Installed, VersionStore


@dataclass
class Probation:
    """A newly active model on trial: golden checks every interval until ``until``."""

    inst: Installed
    until: float
    next_check: float


class Owner(Protocol):
    """What the installer asks of the worker that owns it (the agent)."""

    def reject(
        self,
        dep: Deployment,
        reason: str,
        phase: Phase = Phase.REJECTED,
        detail: dict[str, Any] | None = None,
    ) -> None: ...
    def mark_rejected(self, sha: str, reason: str) -> None: ...
    def wait_for_space(
        self, dep: Deployment, reason: str, detail: dict[str, Any] | None = None
    ) -> None: ...
    def settled(self) -> None: ...
    def allowed(self, inst: Installed) -> str | None: ...


class Installer:
    """Verifies, unpacks, self-tests and activates a fetched artifact; probation and rollback."""

    def __init__(
        self,
        cfg: AgentConfig,
        policy: Policy,
        machine: Machine,
        out: Outbox,
        holder: SessionHolder,
        owner: Owner,
    ) -> None:
        self.cfg, self.policy, self.machine, self.out, self.holder, self.owner = (
            cfg,
            policy,
            machine,
            out,
            holder,
            owner,
        )
        self.versions = VersionStore(cfg.state_dir, cfg.keep_versions)
        self.downloads = cfg.state_dir / "downloads"
        self.active: Installed | None = None
        self.session: InferenceSession | None = None
        self.golden: selftest.AnyGolden | None = None
        self.probation: Probation | None = None
        self._candidate: Installed | None = None  # unpacked during ``install``, not yet active

    # -- restart ----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Load what ``active`` names and resume the machine's phase (see ``Machine.restore``)."""
        self.versions.clean_partial()
        active = self.versions.active()
        phase = self.machine.restore(active.dir.name if active is not None else None)
        if active is not None:
            try:  # agents from before lines.json existed start with the active version
                self.policy.lines.record(active.manifest)
            except OSError as exc:
                log.error("cannot record %s in lines.json: %s", active.label, exc)
            try:
                self._load_active(active)
            except (EdgefleetError, OSError, ValueError) as exc:
                self.active = active
                self.rollback(f"active model does not load after restart: {exc}")
                return
        if phase is Phase.PROBATION and active is not None:
            self._start_probation(active)
            self.out.event(
                "info", "ACTIVE", "restarted during probation; probation starts again", active
            )

    def _load_active(self, inst: Installed) -> None:
        session = selftest.load(inst, self.cfg.threads, self.policy.providers)
        golden = selftest.golden_of(inst)
        try:
            selftest.warm_up(session, golden)  # before serving
        except Exception as exc:  # a runtime's own error types
            session.close()
            raise ValueError(f"warm-up inference failed: {type(exc).__name__}: {exc}") from None
        self._set_active(inst, session, golden)

    def _set_active(
        self,
        inst: Installed | None,
        session: InferenceSession | None,
        golden: selftest.AnyGolden | None,
    ) -> None:
        """Swap the served model through the holder: the old session closes after its last request."""
        self.active, self.session, self.golden = inst, session, golden
        m = None if inst is None else inst.manifest
        self.holder.swap(
            None
            if m is None or inst is None or session is None
            else Loaded(
                m.name, m.version, inst.sha256, m.runtime, session, monitor=self._monitor(inst)
            )
        )
        self.out.notifier.status(self.out.status_line())

    def _monitor(self, inst: Installed) -> Monitor | None:
        """A drift monitor for the version about to serve: none without a reference profile."""
        mc, ref = self.cfg.monitor, inst.manifest.monitor
        if not mc.enabled or ref is None:
            return None
        return Monitor.load(
            inst.dir / ref.file,
            threshold=mc.drift_threshold,
            windows=mc.drift_windows,
            min_count=mc.min_count,
            max_overhead=mc.max_overhead,
            dp_epsilon=mc.dp_epsilon,
        )

    # -- FETCHING -> VERIFIED -> UNPACKED -> SELF_TEST -> ACTIVATING -> PROBATION -----------------
    def install(self, job: FetchJob) -> None:
        """Install a finished download; a full disk before activation (ENOSPC while checking,
        unpacking or saving install.json) discards what it wrote and waits for space."""
        self._candidate = None
        try:
            self._install(job)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self._disk_full(job.desired, exc)
        finally:
            self._candidate = None

    def _disk_full(self, dep: Deployment, exc: OSError) -> None:
        self.versions.clean_partial()  # a half-written unpack
        if self._candidate is not None:
            self.versions.forget(self._candidate)  # never the active one
        self.owner.wait_for_space(dep, f"disk full while installing: {exc}")

    def _install(self, job: FetchJob) -> None:
        dep, store, m = job.desired, job.store, self.machine
        assert store is not None
        try:
            path = store.finish()
            va = verify_artifact(path, self.policy.verify_keys())
            if va.sha256 != dep.sha256:
                raise IntegrityError("artifact sha256 differs from the deployment")
            if job.manifest is not None and va.manifest != job.manifest:
                raise IntegrityError("artifact's manifest differs from the announced one")
            self.policy.check(va.manifest)
        except (EdgefleetError, OSError) as exc:
            if is_disk_full(exc):
                raise
            self.owner.reject(dep, str(exc))
            return
        previous = self.active.dir.name if self.active else None
        m.enter(
            Phase.VERIFIED,
            dep,
            "",
            {"key_id": va.key_id, "fetch": job.stats()},
            sha256=dep.sha256,
            previous=previous,
        )
        m.pause("VERIFIED")
        try:
            inst = self.versions.unpack(va)
        except (EdgefleetError, OSError) as exc:
            if is_disk_full(exc):
                raise
            self.owner.reject(dep, f"unpack failed: {exc}")
            return
        self._candidate = inst
        m.enter(Phase.UNPACKED, dep, "", {"dir": inst.dir.name}, dir=inst.dir.name)
        m.pause("UNPACKED")
        m.enter(Phase.SELF_TEST, dep)
        m.pause("SELF_TEST")
        try:
            session = selftest.load(inst, self.cfg.threads, self.policy.providers)
        except RuntimeTooOldError as exc:
            # Not a flaw of the candidate but of this device's runtime: refused like a wrong
            # profile, so the reason (both versions) is what the operator sees.
            self.versions.forget(inst)
            self.owner.reject(dep, str(exc))
            return
        except (EdgefleetError, OSError, ValueError) as exc:
            self._failed_candidate(dep, inst, f"model does not load: {exc}")
            return
        current = (
            None if self.session is None or self.golden is None else (self.session, self.golden)
        )
        result = selftest.check_candidate(
            session,
            inst,
            self.cfg.install.bench_runs,
            self._p95_budget(inst),
            self.policy.max_regression_pct,
            self.cfg.install.p95_slack_ms,
            current,
            tick=self.out.notifier.watchdog,
        )
        if not result.ok:
            session.close()
            self._failed_candidate(dep, inst, result.reason, result.detail)
            return
        prev = self.active
        try:
            # persisted before the symlink moves: a restart checks which it names
            m.enter(Phase.ACTIVATING)
        except OSError:
            session.close()
            raise
        self.versions.activate(inst)
        self._candidate = None  # active: kept whatever happens next
        try:
            self.policy.lines.record(inst.manifest)
        except OSError as exc:  # a full disk: anti-rollback still holds in memory until a restart
            log.error("cannot record %s in lines.json: %s", inst.label, exc)
        assert result.golden is not None  # set on every passing check
        self._set_active(inst, session, result.golden)
        discard_download(self.downloads, dep.sha256)
        m.enter(
            Phase.PROBATION, inst, "", {**result.detail, "previous": prev.label if prev else None}
        )
        self.out.publish_state(online=True)
        self._start_probation(inst)
        m.pause("ACTIVE")

    def _p95_budget(self, inst: Installed) -> float | None:
        """The on-device p95 budget: the device config's, else the one the model was built
        against (a per-model budget in the signed manifest), else the device profile's."""
        if self.cfg.install.max_p95_ms is not None:
            return self.cfg.install.max_p95_ms
        built = (inst.manifest.budgets or {}).get("max_p95_ms")
        return (
            float(built)
            if isinstance(built, (int, float)) and built > 0
            else self.policy.max_p95_ms
        )

    def _failed_candidate(
        self, dep: Deployment, inst: Installed, reason: str, detail: dict[str, Any] | None = None
    ) -> None:
        """A failure before activation: the previous model never stopped being active."""
        self.versions.forget(inst)
        kept = self.active.label if self.active else None
        self.owner.reject(dep, reason, Phase.ROLLED_BACK, {**(detail or {}), "active": kept})

    # -- PROBATION -> HEALTHY | ROLLED_BACK ---------------------------------------------------------
    def _start_probation(self, inst: Installed) -> None:
        now = time.monotonic()
        self.probation = Probation(
            inst,
            now + self.cfg.install.probation_s,
            now + min(self.cfg.install.probation_interval_s, self.cfg.install.probation_s),
        )

    def tick(self, now: float) -> None:
        """Golden check when due; HEALTHY (prune, then the owner settles) when probation ends."""
        p = self.probation
        if p is None:
            return
        if now >= p.next_check:
            p.next_check = now + self.cfg.install.probation_interval_s
            problem = self.probe()
            if problem is not None:
                self.rollback(f"probation failed: {problem}")
                return
        if now >= p.until:
            self.probation = None
            removed = self.versions.prune()
            self.machine.enter(Phase.HEALTHY, p.inst, "", {"pruned": removed})
            self.owner.settled()

    def probe(self) -> str | None:
        if self.session is None or self.golden is None or self.active is None:
            return "no model loaded"
        return selftest.golden_check(self.session, self.active, self.golden)

    # -- ROLLED_BACK ------------------------------------------------------------------------------
    def previous(self) -> Installed | None:
        """The newest kept version that may serve (trusted key, at or above its floor)."""
        return next((k for k in self.versions.kept() if self.owner.allowed(k) is None), None)

    def enforce_trust(self) -> None:
        """The active model is signed by a revoked key or below its floor: fall back to a kept
        version that may serve, or stop serving; never keep serving it."""
        a = self.active
        problem = None if a is None else self.owner.allowed(a)
        if a is None or problem is None:
            return
        target = self.previous()
        reason = f"{a.label} may no longer serve: {problem}"
        log.warning("%s; %s", reason, f"back to {target.label}" if target else "not serving")
        self.rollback(reason, target=target, fallback=False)

    def rollback(
        self,
        reason: str,
        by_command: bool = False,
        target: Installed | None = None,
        fallback: bool = True,
    ) -> bool:
        """Switch back to ``target``, else (with ``fallback``) the previous version that may
        serve, else to none; mark the failed one rejected."""
        failed = self.active
        prev = target or (self.previous() if fallback else None)
        session = golden = None
        while prev is not None:
            try:
                session, golden = (
                    selftest.load(prev, self.cfg.threads, self.policy.providers),
                    selftest.golden_of(prev),
                )
                break
            except (EdgefleetError, OSError, ValueError) as exc:
                log.warning("previous version %s does not load: %s", prev.label, exc)
                self.versions.forget(prev)
                prev = None if target is not None or not fallback else self.previous()
        if by_command and prev is None:
            return False
        if prev is not None:
            self.versions.activate(prev)
        else:
            self.versions.deactivate()
        self._set_active(prev, session, golden)
        self.probation = None
        if failed is not None:
            self.owner.mark_rejected(failed.sha256, reason)
            self.versions.forget(failed)
        self.machine.enter(
            Phase.ROLLED_BACK, failed, reason, {"active": prev.label if prev else None}
        )
        self.out.publish_state(online=True)
        return True
