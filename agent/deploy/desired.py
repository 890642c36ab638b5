"""The desired deployment: what the fleet wants this device to run.

Retained, signed deployments on this device's topic and on each of its groups'; each is opened
against the trust document (agent.deploy.trust) and checked against this device's profile, and
a refused one leaves the one held before. The device's own deployment wins over its groups'
(in config order). A part of the agent owned by its one worker thread; the agent decides what
to fetch from ``current()``.
"""

from __future__ import annotations

from agent.config import AgentConfig
from agent.deploy.machine import AgentFile
from agent.deploy.outbox import Outbox
from agent.deploy.policy import Policy
from agent.protocol.messages import MAX_CONTROL_BYTES, Deployment, MessageError, validate
from agent.protocol.trust import Target, TrustError


class Desired:
    """The deployments held for this device and for each of its groups (None: none or cleared)."""

    def __init__(self, cfg: AgentConfig, policy: Policy, out: Outbox, file: AgentFile) -> None:
        self.cfg, self.policy, self.out, self.file = cfg, policy, out, file
        self.device: Deployment | None = None
        self.groups: dict[str, Deployment | None] = {}

    def current(self) -> Deployment | None:
        """The deployment that wins: this device's, else the first of its groups' that is set."""
        if self.device is not None:
            return self.device
        for g in self.cfg.groups:
            if self.groups.get(g) is not None:
                return self.groups[g]
        return None

    def on_device(self, topic: str, payload: bytes) -> None:
        self.device = self._open(topic, payload, self.device, Target(device=self.cfg.device_id))

    def on_group(self, group: str, topic: str, payload: bytes) -> None:
        self.groups[group] = self._open(topic, payload, self.groups.get(group), Target(group=group))

    def deployed_at(self, sha: str) -> str:
        """The ``deployed_at`` of the held deployment that names ``sha`` ("" if none does)."""
        for d in (self.device, *self.groups.values()):
            if d is not None and d.sha256 == sha:
                return d.deployed_at
        return ""

    def _open(
        self, topic: str, payload: bytes, old: Deployment | None, target: Target
    ) -> Deployment | None:
        """The desired deployment a signed envelope sets, or ``old`` when it is refused."""
        if not payload:
            return None  # retained deployment cleared: nothing new is installed
        channel = topic  # one counter per deployment topic (this device's, each group's)
        try:
            env, new = self.policy.trust.open(
                payload, "deployment", target, channel, MAX_CONTROL_BYTES
            )
            dep = validate(Deployment, env.signed.body)
        except (TrustError, MessageError) as exc:
            self.out.bad(topic, str(exc))
            return old
        if new:
            self.policy.trust.commit(channel, env)
        if dep.profile is not None and dep.profile != self.cfg.profile:
            # A refused message, not a step of the machine: whatever is in flight goes on.
            self.out.event(
                "deployment",
                "REJECTED",
                f"deployment is for profile '{dep.profile}', this device is '{self.cfg.profile}'",
                dep,
            )
            return old
        rej = self.file.rejected.get(dep.sha256)
        if rej is not None and dep.deployed_at and rej.get("deployed_at") != dep.deployed_at:
            del self.file.rejected[
                dep.sha256
            ]  # a new deployment of a rejected artifact tries again
            self.file.save()
        return dep
