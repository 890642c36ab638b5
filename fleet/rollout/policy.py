"""Staged (canary) rollout: the decision logic, free of MQTT so it can be fed fake messages.

A rollout deploys one artifact to a few *canary* devices of a group first (per-device
deployments), judges them from their events (and telemetry when devices send it), and only
then sets the group's deployment. ``Rollout.feed`` takes every message the watcher sees;
``canary_verdict`` / ``device_health`` say whether to wait, go on or halt, and why.
The MQTT side (publishing, rollback, the clock) lives in fleet/deploy.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from agent.errors import UsageError
from agent.protocol import topics
from agent.protocol.messages import Event, MessageError, StateMessage, Telemetry, decode
from agent.protocol.states import FAILED, IN_PROGRESS, INSTALLING, SERVING, TERMINAL, p95_regressed
from fleet.monitor_store import MonitorWindow
from fleet.rollout import output_drift

Verdict = Literal["wait", "ok", "fail"]
CANARY_RE = re.compile(r"^(\d{1,6})(%?)$")
# A device's state is an agent state (agent.protocol.states) or one of the rollout's own two:
PENDING = "pending"  # no event for the artifact yet
ROLLBACK_FAILED = "FAILED"  # the rollout's rollback command failed or went unanswered
# Terminal device states shown in the table; anything else is in progress.
DONE_STATES = (*TERMINAL, ROLLBACK_FAILED)
BAD_STATES = (*FAILED, ROLLBACK_FAILED)
# The reason of a device that ran the artifact before the rollout began (it is neither judged
# nor rolled back); compared against, so spelled once.
ALREADY_ACTIVE = "already active before the rollout"


@dataclass(frozen=True)
class Gate:
    """What a canary must show: p95 no worse than before by more than pct (+ slack), no errors.

    ``observe_s``: a canary ACTIVE that long without a rollback or error counts as healthy
    without waiting for the agent's probation to end (None: wait for HEALTHY).
    ``max_output_drift`` (opt-in): the most a canary's predicted-class distribution may diverge
    from the old model's on the not-yet-updated members (fleet/rollout/output_drift.py), judged
    once each side reported ``min_output_samples`` predictions.
    Text-generation models (telemetry ``generation`` blocks): the canary's decode tokens/s may
    be at most ``max_tok_s_drop_pct`` lower, and its TTFT p95 at most ``max_ttft_regression_pct``
    (+ ``ttft_slack_ms``) higher, than the replaced model's on the same device.
    """

    max_p95_regression_pct: float = 20.0
    p95_slack_ms: float = 0.5
    observe_s: float | None = None
    max_output_drift: float | None = None
    min_output_samples: int = 100
    max_tok_s_drop_pct: float = 20.0
    max_ttft_regression_pct: float = 20.0
    ttft_slack_ms: float = 5.0

    def p95_problem(self, new: float | None, old: float | None, source: str) -> str | None:
        if (
            new is None
            or old is None
            or not p95_regressed(new, old, self.max_p95_regression_pct, self.p95_slack_ms)
        ):
            return None
        pct = (new / old - 1) * 100 if old > 0 else math.inf
        return (
            f"{source} p95 {new:.3f} ms vs {old:.3f} ms before (+{pct:.0f}%; allowed "
            f"{self.max_p95_regression_pct:g}% + {self.p95_slack_ms:g} ms)"
        )

    def tok_s_problem(self, new: float | None, old: float | None) -> str | None:
        if new is None or old is None or new >= old * (1 - self.max_tok_s_drop_pct / 100.0):
            return None
        return (
            f"telemetry decode {new:.1f} tokens/s vs {old:.1f} before "
            f"({(new / old - 1) * 100:.0f}%; allowed -{self.max_tok_s_drop_pct:g}%)"
        )

    def ttft_problem(self, new: float | None, old: float | None) -> str | None:
        if (
            new is None
            or old is None
            or not p95_regressed(new, old, self.max_ttft_regression_pct, self.ttft_slack_ms)
        ):
            return None
        return (
            f"telemetry TTFT p95 {new:.1f} ms vs {old:.1f} ms before (allowed "
            f"+{self.max_ttft_regression_pct:g}% + {self.ttft_slack_ms:g} ms)"
        )


@dataclass
class DeviceView:
    """What the watcher knows about one device of the group."""

    device: str
    role: Literal["canary", "rest"] = "rest"
    online: bool = False
    profile: str = ""
    active_sha: str | None = None
    state: str = PENDING
    progress: float | None = None
    reason: str = ""
    p95_ms: float | None = None
    current_p95_ms: float | None = None
    tele_before_p95: float | None = None
    tele_after_p95: float | None = None
    tele_errors: int = 0
    # text generation (telemetry generation blocks): decode tokens/s and TTFT p95
    tok_s_before: float | None = None
    tok_s_after: float | None = None
    ttft_before: float | None = None
    ttft_after: float | None = None
    active_at: float | None = None
    rolled_back: bool = False
    classes_new: dict[str, float] = field(default_factory=dict)  # class counts on the new model
    classes_old: dict[str, float] = field(default_factory=dict)  # ... on any other model

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("active_at")
        return d


def parse_canary(spec: str) -> tuple[int, bool]:
    """'2' -> (2, False); '25%' -> (25, True)."""
    m = CANARY_RE.match(spec.strip())
    if not m:
        raise UsageError(f"--canary {spec!r}: expected a count such as 1 or a share such as 25%")
    n, pct = int(m.group(1)), bool(m.group(2))
    if pct and not 0 < n <= 100:
        raise UsageError(f"--canary {spec!r}: a share must be between 1% and 100%")
    return n, pct


def select_canaries(devices: dict[str, DeviceView], spec: str) -> list[str]:
    """The first N (or N% of the group, at least one) online devices by id: a deterministic choice."""
    n, pct = parse_canary(spec)
    count = max(1, math.ceil(len(devices) * n / 100)) if pct else n
    online = sorted(d for d, v in devices.items() if v.online)
    return online[:count]


def group_members(
    states: dict[str, bytes], group: str, profile: str | None = None
) -> dict[str, DeviceView]:
    """Devices whose retained state lists ``group`` (and, when given, serve ``profile``)."""
    out: dict[str, DeviceView] = {}
    for topic, payload in states.items():
        t = topics.parse(topic)
        if t is None or t.kind != "state" or not payload:
            continue
        try:
            s = decode(StateMessage, payload)
        except MessageError:
            continue
        if group in s.groups and (profile is None or s.profile == profile):
            out[s.device] = DeviceView(
                s.device,
                online=s.online,
                profile=s.profile,
                active_sha=s.active.sha256 if s.active else None,
            )
    return out


@dataclass
class Rollout:
    """The state of one rollout of ``sha`` to a group; feed it messages, ask it what to do."""

    name: str
    version: str
    sha: str
    devices: dict[str, DeviceView]
    canaries: list[str]
    gate: Gate = field(default_factory=Gate)
    phase: str = "canary"  # canary -> promoted -> done | halted
    reason: str = ""

    def __post_init__(self) -> None:
        for d in self.canaries:
            self.devices[d].role = "canary"
        for v in self.devices.values():
            if v.active_sha == self.sha:
                v.state, v.reason = "HEALTHY", ALREADY_ACTIVE

    # -- input ------------------------------------------------------------------------------------
    def feed(self, topic: str, payload: bytes, now: float) -> bool:
        """Take one message; True when it changed what we know (worth redrawing)."""
        t = topics.parse(topic)
        if t is None or t.device is None or t.device not in self.devices or not payload:
            return False
        v = self.devices[t.device]
        try:
            if t.kind == "state":
                return self._state(v, decode(StateMessage, payload))
            if t.kind == "events":
                return self._event(v, decode(Event, payload), now)
            if t.kind == "telemetry":
                return self._telemetry(v, decode(Telemetry, payload))
        except MessageError:
            return False
        return False

    def _state(self, v: DeviceView, s: StateMessage) -> bool:
        before = (v.online, v.active_sha)
        v.online, v.active_sha = s.online, (s.active.sha256 if s.active else None)
        return before != (v.online, v.active_sha)

    def _event(self, v: DeviceView, ev: Event, now: float) -> bool:
        if ev.kind != "deployment" or ev.sha256 != self.sha or ev.state is None:
            return False
        if ev.state == "FETCHING":
            p = ev.detail.get("progress")
            v.progress = float(p) if isinstance(p, (int, float)) else v.progress or 0.0
        if ev.state == "ACTIVE":
            v.active_at, v.active_sha = now, self.sha
            v.p95_ms = _num(ev.detail.get("p95_ms"))
            v.current_p95_ms = _num(ev.detail.get("current_p95_ms"))
        if ev.state in FAILED:
            v.reason = ev.reason
            if v.active_sha == self.sha:
                v.active_sha = None  # the state message that follows says which one is active now
        if ev.state == "HEALTHY":
            v.progress = 1.0
        v.state = ev.state
        return True

    def _telemetry(self, v: DeviceView, tm: Telemetry) -> bool:
        lat = tm.latency
        if tm.active is None:
            return False
        classes = MonitorWindow.parse(tm.monitor).classes if tm.monitor else None
        if classes:
            new = tm.active.sha256 == self.sha
            output_drift.add_counts(v.classes_new if new else v.classes_old, classes)
        gen = self._generation(v, tm)
        if lat.count == 0:
            return bool(classes) or gen
        if tm.active.sha256 == self.sha:
            v.tele_after_p95 = lat.p95_ms if lat.p95_ms is not None else v.tele_after_p95
            v.tele_errors += lat.errors
        elif v.state == PENDING or v.state in IN_PROGRESS:
            v.tele_before_p95 = lat.p95_ms if lat.p95_ms is not None else v.tele_before_p95
        return True

    def _generation(self, v: DeviceView, tm: Telemetry) -> bool:
        """Fold a generation block into the device's before/after figures (latest window wins)."""
        g, a = tm.generation, tm.active
        if g is None or a is None:
            return False
        if a.sha256 == self.sha:
            v.tok_s_after = g.tok_s if g.tok_s is not None else v.tok_s_after
            v.ttft_after = g.ttft_p95_ms if g.ttft_p95_ms is not None else v.ttft_after
            v.tele_errors += g.errors
        elif v.state == PENDING or v.state in IN_PROGRESS:
            v.tok_s_before = g.tok_s if g.tok_s is not None else v.tok_s_before
            v.ttft_before = g.ttft_p95_ms if g.ttft_p95_ms is not None else v.ttft_before
        return True

    # -- decisions ----------------------------------------------------------------------------------
    def device_health(self, dev: str, now: float) -> tuple[Verdict, str]:
        v = self.devices[dev]
        if v.state in FAILED:
            return "fail", f"{dev}: {v.state}: {v.reason or 'no reason given'}"
        if v.state not in SERVING:
            return "wait", ""
        if v.reason == ALREADY_ACTIVE:
            return "ok", ""
        for problem in (
            self.gate.p95_problem(v.p95_ms, v.current_p95_ms, "on-device"),
            self.gate.p95_problem(v.tele_after_p95, v.tele_before_p95, "telemetry"),
            self.gate.tok_s_problem(v.tok_s_after, v.tok_s_before),
            self.gate.ttft_problem(v.ttft_after, v.ttft_before),
        ):
            if problem:
                return "fail", f"{dev}: {problem}"
        if v.tele_errors:
            return "fail", f"{dev}: {v.tele_errors} inference errors reported in telemetry"
        if v.state == "HEALTHY":
            return "ok", ""
        if (
            self.gate.observe_s is not None
            and v.active_at is not None
            and now - v.active_at >= self.gate.observe_s
        ):
            return "ok", ""
        return "wait", ""

    def canary_verdict(self, now: float) -> tuple[Verdict, str]:
        """fail as soon as one canary fails; ok when every canary is healthy (and, with
        ``max_output_drift``, predicts like the old model does on the rest of the group)."""
        verdicts = [self._output_drift(d, *self.device_health(d, now)) for d in self.canaries]
        fails = [r for v, r in verdicts if v == "fail"]
        if fails:
            return "fail", "; ".join(fails)
        if all(v == "ok" for v, _ in verdicts):
            return "ok", ""
        return "wait", "; ".join(r for v, r in verdicts if v == "wait" and r)

    def _output_drift(self, dev: str, verdict: Verdict, reason: str) -> tuple[Verdict, str]:
        """A healthy canary, further judged on its output distribution when the gate asks."""
        v = self.devices[dev]
        if verdict != "ok" or self.gate.max_output_drift is None or v.reason == ALREADY_ACTIVE:
            return verdict, reason
        old: dict[str, float] = {}
        for other in self.devices.values():
            if other.role == "rest":
                output_drift.add_counts(old, other.classes_old)
        return output_drift.check(
            dev, v.classes_new, old, self.gate.max_output_drift, self.gate.min_output_samples
        )

    def rest_verdict(self, now: float) -> tuple[Verdict, list[str], list[str]]:
        """After promotion: (ok|wait|fail, failures, pending offline devices). Offline ones don't block."""
        fails: list[str] = []
        waiting: list[str] = []
        pending: list[str] = []
        for d, v in sorted(self.devices.items()):
            if v.role == "canary":
                continue
            verdict, reason = self.device_health(d, now)
            if verdict == "fail":
                fails.append(reason)
            elif verdict == "wait":
                (waiting if v.online else pending).append(d)
        if waiting:
            return "wait", fails, pending
        return ("fail" if fails else "ok"), fails, pending

    def needs_rollback(self, dev: str) -> bool:
        """A canary running the new artifact (the agent rolls itself back only on its own failures)."""
        v = self.devices[dev]
        return (
            v.active_sha == self.sha
            and v.state not in FAILED
            and not v.rolled_back
            and v.reason != ALREADY_ACTIVE
        )

    def installing(self, dev: str) -> bool:
        """Past VERIFIED and not yet ACTIVE: the agent completes this install whatever it receives."""
        return self.devices[dev].state in INSTALLING

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.phase == "done",
            "name": self.name,
            "version": self.version,
            "sha256": self.sha,
            "phase": self.phase,
            "reason": self.reason,
            "canaries": self.canaries,
            "pending": sorted(
                d for d, v in self.devices.items() if not v.online and v.state not in DONE_STATES
            ),
            "devices": {d: v.summary() for d, v in sorted(self.devices.items())},
        }

    def json(self) -> str:
        return json.dumps(self.summary())


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None
