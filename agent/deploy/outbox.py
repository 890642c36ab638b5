"""The agent's state and how it reports it: persisted seq/rejections, state and events.

Base of ``agent.deploy.agent.Agent`` (via ``Installer`` and ``Commands``); every method here
runs on the one worker thread that owns the state, like the rest of the agent.
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
from agent.deploy.fetch import FetchJob
from agent.deploy.policy import Policy
from agent.protocol import topics
from agent.protocol.golden import GoldenSet
from agent.protocol.messages import (
    ActiveModel,
    Deployment,
    DeployState,
    DeviceInfo,
    Event,
    StateMessage,
    encode,
)
from agent.runtime import InferenceSession
from agent.serve.holder import SessionHolder
from agent.serve.local import LocalModel
from agent.service import Notifier
from agent.store.chunks import discard_download
from agent.store.fsutil import read_json, write_json
from agent.store.versions import Installed, VersionStore
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.thermal import ThermalReader
from agent.transport.base import Transport

# One logger for the whole reconcile loop (state, install, commands), named as before the split.
log = logging.getLogger("agent.deploy.agent")

# Test hook (documented in docs/protocol.md): sleep at this deployment state so a test can
# SIGKILL the process there. FETCHING pauses once half the chunks are on disk.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
QUEUE_MAX = 10_000
SEQ_SAVE_EVERY = 64


@dataclass
class Probation:
    """A newly active model on trial: golden checks every interval until ``until``."""

    inst: Installed
    until: float
    next_check: float


class AgentState:
    """What the worker owns (desired, active, fetch job, probation) and the messages it publishes."""

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
        # Saved now too: a run that sends fewer than SEQ_SAVE_EVERY messages must still move the
        # next start's seq ahead of every seq it sent.
        self._save_agent()
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

    def _reconcile(self) -> None:
        """Start, keep or cancel the fetch the desired deployment needs (``Agent`` implements it)."""
        raise NotImplementedError

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
                                   active=self._active_model(), seq=self._next_seq(), ts=time.time(),
                                   device_info=self._device_info()))

    def _device_info(self) -> DeviceInfo:
        d = self.policy.device
        return DeviceInfo(machine=d.machine, python=d.python, system=d.system, runtimes=dict(d.runtimes),
                          warnings=list(self.policy.warnings))

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

    def status_line(self) -> str:
        """What the agent serves, for systemd's STATUS=."""
        a = self.active
        return f"serving {a.manifest.name} {a.manifest.version}" if a else "no model active"

    # -- desired deployment and rejections ----------------------------------------------------------
    def _desired(self) -> Deployment | None:
        if self.desired_device is not None:
            return self.desired_device
        for g in self.cfg.groups:
            if self.desired_groups.get(g) is not None:
                return self.desired_groups[g]
        return None

    def _deployed_at(self, sha: str) -> str:
        for d in (self.desired_device, *self.desired_groups.values()):
            if d is not None and d.sha256 == sha:
                return d.deployed_at
        return ""

    def _reject(self, dep: Deployment, reason: str, state: DeployState = "REJECTED",
                detail: dict[str, Any] | None = None) -> None:
        self.rejected[dep.sha256] = {"reason": reason, "deployed_at": dep.deployed_at}
        self._save_agent()
        if self.job is not None and self.job.sha == dep.sha256:
            self.job.cancel(self.t)
            self.job = None
        discard_download(self.downloads, dep.sha256)
        self._event("deployment", state, reason, dep, detail)
