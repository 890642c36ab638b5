"""Install, activation, probation and rollback: what happens once an artifact is on disk.

``Installer`` is the middle of the agent's class chain (``AgentState`` -> ``Installer`` ->
``Commands`` -> ``Agent``); it runs on the agent's one worker thread. A failure before
activation keeps the previous model serving (ROLLED_BACK); one during probation switches back.
"""

from __future__ import annotations

import time
from typing import Any

from agent.deploy import selftest
from agent.deploy.fetch import FetchJob
from agent.deploy.state import AgentState, Probation, log
from agent.errors import EdgefleetError, IntegrityError, RuntimeTooOldError
from agent.protocol.artifact import verify_artifact
from agent.protocol.golden import GoldenSet
from agent.protocol.messages import Deployment
from agent.runtime import InferenceSession
from agent.serve.holder import Loaded
from agent.store.chunks import discard_download
from agent.store.fsutil import read_json, remove, write_json
from agent.store.versions import Installed


class Installer(AgentState):
    """Verifies, unpacks, self-tests and activates a fetched artifact; probation and rollback."""

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
            session.infer(golden.bench_feed())  # warm-up before serving
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
        except RuntimeTooOldError as exc:
            # Not a flaw of the candidate but of this device's runtime: refused like a wrong
            # profile, so the reason (both versions) is what the operator sees.
            self.versions.forget(inst)
            remove(self.install_path)
            self._reject(dep, str(exc))
            return
        except (EdgefleetError, OSError, ValueError) as exc:
            self._failed_candidate(dep, inst, f"model does not load: {exc}")
            return
        current = None if self.session is None or self.golden is None else (self.session, self.golden)
        result = selftest.check_candidate(
            session, inst, self.cfg.install.bench_runs, self._p95_budget(inst),
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
        assert result.golden is not None  # set on every passing check
        self._set_active(inst, session, result.golden)
        write_json(self.install_path, {"sha256": dep.sha256, "dir": inst.dir.name, "state": "PROBATION",
                                       "previous": previous.dir.name if previous else None})
        discard_download(self.downloads, dep.sha256)
        self._event("deployment", "ACTIVE", "", inst, {**result.detail,
                    "previous": previous.label if previous else None})
        self._publish_state(online=True)
        self._start_probation(inst)
        self._pause("ACTIVE")

    def _p95_budget(self, inst: Installed) -> float | None:
        """The on-device p95 budget: the device config's, else the one the model was built
        against (a per-model budget in the signed manifest), else the device profile's."""
        if self.cfg.install.max_p95_ms is not None:
            return self.cfg.install.max_p95_ms
        built = (inst.manifest.budgets or {}).get("max_p95_ms")
        return float(built) if isinstance(built, (int, float)) and built > 0 else self.policy.max_p95_ms

    def _failed_candidate(self, dep: Deployment, inst: Installed, reason: str,
                          detail: dict[str, Any] | None = None) -> None:
        """A failure before activation: the previous model never stopped being active."""
        self.versions.forget(inst)
        remove(self.install_path)
        kept = self.active.label if self.active else None
        self._reject(dep, reason, "ROLLED_BACK", {**(detail or {}), "active": kept})

    # -- probation ------------------------------------------------------------------------------
    def _start_probation(self, inst: Installed) -> None:
        now = time.monotonic()
        self.probation = Probation(inst, now + self.cfg.install.probation_s,
                                   now + min(self.cfg.install.probation_interval_s, self.cfg.install.probation_s))

    def _tick_probation(self, now: float) -> None:
        """Golden check when due; HEALTHY (prune, clean downloads, reconcile) when probation ends."""
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

    # -- rollback -------------------------------------------------------------------------------
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
