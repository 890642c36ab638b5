"""What the agent says: its state (birth) message and its events, each with the next seq.

A part of the agent owned by its one worker thread (``agent.deploy.agent.Agent``); the
deploy machine reports through ``deployment``. seq is saved in agent.json every
SEQ_SAVE_EVERY messages and a start begins that far ahead, so it only ever increases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.deploy.machine import AgentFile
from agent.deploy.policy import Policy
from agent.protocol import topics
from agent.protocol.messages import (
    ActiveModel,
    Deployment,
    DeviceInfo,
    Event,
    PendingDeployment,
    StateMessage,
    encode,
    encode_state,
)
from agent.protocol.states import IN_PROGRESS, DeployState
from agent.service import Notifier
from agent.store.versions import Installed
from agent.transport.base import Transport

# One logger for the whole reconcile loop (machine, install, commands), named as before the split.
log = logging.getLogger("agent.deploy.agent")
SEQ_SAVE_EVERY = 64
_DOING = {
    "FETCHING": "fetching",
    "VERIFIED": "verified",
    "UNPACKED": "unpacked",
    "SELF_TEST": "self-test",
}


class Outbox:
    """Publishes state and events; keeps systemd's STATUS= in step with what it reports."""

    def __init__(
        self,
        cfg: AgentConfig,
        policy: Policy,
        transport: Transport,
        file: AgentFile,
        active: Callable[[], Installed | None],
    ) -> None:
        self.cfg, self.policy, self.t, self.file = cfg, policy, transport, file
        self.dev = cfg.device_id
        self.active = active
        # The deployment being fetched, for the state message (set by the agent: the fetcher's).
        self.pending: Callable[[], PendingDeployment | None] = lambda: None
        # systemd sd_notify (READY, WATCHDOG, STATUS); sends nothing outside systemd
        self.notifier = Notifier(None)
        # Saved now too: a run that sends fewer than SEQ_SAVE_EVERY messages must still move the
        # next start's seq ahead of every seq it sent.
        file.seq += SEQ_SAVE_EVERY
        file.save()

    @property
    def seq(self) -> int:
        """The last seq sent; kept in the agent.json record, so any save writes the current one."""
        return self.file.seq

    def next_seq(self) -> int:
        self.file.seq += 1
        # A rename per message would slow a transfer down; after a failed save (a full disk)
        # every message tries again, so the saved floor catches up as soon as there is room.
        if self.file.seq % SEQ_SAVE_EVERY == 0 or self.file.unsaved:
            self.file.save()
        return self.file.seq

    def active_model(self) -> ActiveModel | None:
        a = self.active()
        return (
            None
            if a is None
            else ActiveModel(name=a.manifest.name, version=a.manifest.version, sha256=a.sha256)
        )

    def state_payload(self, online: bool) -> bytes:
        d = self.policy.device
        info = DeviceInfo(
            machine=d.machine,
            python=d.python,
            system=d.system,
            runtimes=dict(d.runtimes),
            warnings=list(self.policy.warnings),
        )
        return encode_state(
            StateMessage(
                device=self.dev,
                online=online,
                agent_version=__version__,
                profile=self.cfg.profile,
                groups=list(self.cfg.groups),
                active=self.active_model(),
                seq=self.next_seq(),
                ts=time.time(),
                device_info=info,
                pending=self.pending(),
            )
        )

    def publish_state(self, online: bool) -> None:
        self.t.publish(
            topics.device_topic(self.dev, "state"), self.state_payload(online), retain=True
        )

    def event(
        self,
        kind: str,
        state: DeployState | None = None,
        reason: str = "",
        subject: Deployment | Installed | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        name = version = sha = None
        if isinstance(subject, Deployment):
            name, version, sha = subject.name, subject.version, subject.sha256
        elif isinstance(subject, Installed):
            name, version, sha = subject.manifest.name, subject.manifest.version, subject.sha256
        ev = Event(
            device=self.dev,
            seq=self.next_seq(),
            ts=time.time(),
            kind=kind,  # type: ignore[arg-type]
            state=state,
            name=name,
            version=version,
            sha256=sha,
            reason=reason[:2000],
            detail=detail or {},
        )
        log.log(
            logging.WARNING if reason else logging.INFO,
            "event %s %s %s@%s %s",
            kind,
            state or "",
            name,
            version,
            reason,
        )
        if kind == "deployment" and state in IN_PROGRESS:
            pct = (detail or {}).get("progress")
            self.notifier.status(
                f"{_DOING[state]} {name} {version}"
                + (f" {pct:.0%}" if isinstance(pct, float) else "")
                + f" ({self.status_line()})"
            )
        elif kind == "deployment":
            self.notifier.status(self.status_line())
        self.t.publish(topics.device_topic(self.dev, "events"), encode(ev))

    def deployment(
        self, state: DeployState, reason: str, subject: Any, detail: dict[str, Any] | None
    ) -> None:
        """The machine's report of a phase (``Machine.report``)."""
        self.event("deployment", state, reason, subject, detail)

    def bad(self, topic: str, reason: str) -> None:
        self.event("bad_message", reason=reason, detail={"topic": topic[:200]})

    def status_line(self) -> str:
        """What the agent serves, for systemd's STATUS=."""
        a = self.active()
        return f"serving {a.manifest.name} {a.manifest.version}" if a else "no model active"
