"""Set the desired deployment of a device or a group (a retained message).

NAME@VERSION is resolved to an artifact sha256 through the retained index the publisher keeps
at edgefleet/v1/artifacts/index/NAME/VERSION/PROFILE. When several profiles exist, the one
asked for (--profile), else the device's (from its retained state), else the group's name.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.broker import BrokerConfig
from agent.errors import RolloutHalted, UsageError
from agent.protocol import topics
from agent.protocol.manifest import VERSION_RE
from agent.protocol.messages import Command, Deployment, IndexEntry, MessageError, decode, encode
from fleet.mqtt import Message, SyncClient, connect
from fleet.rollout import (
    Gate,
    Rollout,
    group_members,
    parse_canary,
    select_canaries,
)

LOOKUP_TRIES = 3
SPEC_RE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62})@(\S+)$")


@dataclass(frozen=True)
class DeployResult:
    topic: str
    deployment: Deployment


def parse_spec(spec: str) -> tuple[str, str]:
    m = SPEC_RE.match(spec)
    if not m or not VERSION_RE.match(m.group(2)):
        raise UsageError(f"'{spec}': expected NAME@VERSION such as digits@1.2.0")
    return m.group(1), m.group(2)


def _device_profile(c: SyncClient, device: str) -> str | None:
    got = c.retained(topics.device_topic(device, "state"), quiet=0.3, limit=1.5)
    for payload in got.values():
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        if isinstance(doc, dict) and isinstance(doc.get("profile"), str):
            return str(doc["profile"])
    return None


def resolve(c: SyncClient, name: str, version: str, profile: str | None, device: str | None,
            group: str | None) -> IndexEntry:
    found: dict[str, IndexEntry] = {}
    # bounded retries: a broker may answer a publish before its retained copy is visible (amqtt)
    for attempt in range(LOOKUP_TRIES):
        for payload in c.retained(topics.artifact_index_versions(name, version)).values():
            try:
                e = decode(IndexEntry, payload)
            except MessageError:
                continue
            if (e.name, e.version) == (name, version):  # a loose broker may send other topics too
                found[e.profile] = e
        if found:
            break
        if attempt < LOOKUP_TRIES - 1:
            time.sleep(0.5)
    if not found:
        raise UsageError(f"{name}@{version} is not published on {c.cfg.url} (run `edgefleet publish` first)")
    if profile is None and device is not None:
        profile = _device_profile(c, device)
    if profile is None and group is not None and group in found:
        profile = group
    if profile is None and len(found) == 1:
        profile = next(iter(found))
    if profile is None or profile not in found:
        raise UsageError(f"{name}@{version} is published for profiles {', '.join(sorted(found))}; "
                         f"choose one with --profile" + (f" ('{profile}' has none)" if profile else ""))
    return found[profile]


def deploy(broker: BrokerConfig, spec: str, device: str | None = None, group: str | None = None,
           profile: str | None = None, client: SyncClient | None = None) -> DeployResult:
    if (device is None) == (group is None):
        raise UsageError("give exactly one of --device ID or --group G")
    name, version = parse_spec(spec)
    try:
        topic = topics.device_topic(device, "deployment") if device else topics.group_deployment(group or "")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    own = client is None
    c = client or SyncClient(broker).__enter__()
    try:
        entry = resolve(c, name, version, profile, device, group)
        dep = Deployment(name=name, version=version, sha256=entry.sha256, profile=entry.profile,
                         deployed_at=_now_iso())
        c.publish(topic, encode(dep), retain=True)
        c.flush()
    finally:
        if own:
            c.close()
    return DeployResult(topic, dep)


# ---------------------------------------------------------------------------- staged rollout

def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class _Feed:
    """Every message on the watched topics, queued from paho's thread for the rollout loop."""

    PATTERNS = ("state", "events", "telemetry", "cmd/result")

    def __init__(self, c: SyncClient) -> None:
        self.listener = c.listen([(f"{topics.PREFIX}/devices/+/{leaf}", 1) for leaf in self.PATTERNS])

    def get(self, timeout: float) -> Message | None:
        return self.listener.get(timeout)


def _pump(feed: _Feed, ro: Rollout, seconds: float, on_change: Callable[[Rollout], None],
          results: dict[str, dict[str, Any]] | None = None) -> None:
    """Feed messages to the rollout for up to ``seconds`` (returns early once the queue is idle)."""
    end = time.monotonic() + seconds
    changed = False
    while (left := end - time.monotonic()) > 0:
        item = feed.get(min(left, 0.2))
        if item is None:
            break
        topic, payload = item.topic, item.payload
        if results is not None and topic.endswith("/cmd/result"):
            with contextlib.suppress(ValueError):
                doc = json.loads(payload)
                if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                    results[doc["id"]] = doc
        changed |= ro.feed(topic, payload, time.monotonic())
    if changed:
        on_change(ro)


def _send_rollbacks(c: SyncClient, feed: _Feed, ro: Rollout, devices: list[str],
                    on_change: Callable[[Rollout], None], wait_s: float) -> None:
    """A rollback command to each of ``devices``; waits (bounded) for their answers."""
    results: dict[str, dict[str, Any]] = {}
    sent: dict[str, str] = {}
    for d in devices:
        cid = f"rollout-{uuid.uuid4().hex[:12]}"
        c.publish(topics.device_topic(d, "cmd"), encode(Command(id=cid, op="rollback")), retain=False)
        sent[d] = cid
    c.flush()
    end = time.monotonic() + wait_s
    while sent and time.monotonic() < end and not all(cid in results for cid in sent.values()):
        _pump(feed, ro, 0.5, on_change, results)
    for d, cid in sent.items():
        res = results.get(cid)
        v = ro.devices[d]
        if res is not None and res.get("ok"):
            v.rolled_back, v.state = True, "ROLLED_BACK"
            v.reason = v.reason or "rolled back by the rollout"
        else:
            v.state = "FAILED"
            v.reason = f"rollback command {cid}: " + (str(res.get("reason")) if res else f"no answer within {wait_s:g}s")


def _rollback_canaries(c: SyncClient, feed: _Feed, ro: Rollout, published: list[str],
                       on_change: Callable[[Rollout], None], wait_s: float = 20.0, late_s: float = 30.0) -> None:
    """Roll back canaries that run the new artifact, then clear their device deployments.

    The rollback command comes first: it marks the artifact rejected on the device, so clearing
    the device deployment afterwards falls back to the group's (older, active) deployment
    without the agent fetching anything. A canary that failed its self-test never switched.
    A canary still installing (past VERIFIED the agent finishes the install whatever arrives)
    is watched for up to ``late_s`` and rolled back if it turns ACTIVE.
    """
    _send_rollbacks(c, feed, ro, [d for d in ro.canaries if ro.needs_rollback(d)], on_change, wait_s)
    for d in published:
        c.publish(topics.device_topic(d, "deployment"), b"", retain=True)
    c.flush()
    end = time.monotonic() + late_s
    while any(ro.installing(d) for d in ro.canaries) and time.monotonic() < end:
        _pump(feed, ro, 0.5, on_change)
    late = [d for d in ro.canaries if ro.needs_rollback(d)]
    if late:
        _send_rollbacks(c, feed, ro, late, on_change, wait_s)
    on_change(ro)


def staged_rollout(broker: BrokerConfig, spec: str, group: str, canary: str | None, profile: str | None = None,
                   gate: Gate | None = None, wait: bool = False, timeout: float = 600.0,
                   on_change: Callable[[Rollout], None] = lambda ro: None) -> Rollout:
    """Deploy to canaries, judge them, then set the group's deployment (or halt and roll back).

    Returns the finished Rollout; ``phase`` is done, halted, failed or incomplete. ``timeout``
    bounds each phase (canaries; then the rest of the group with ``wait``).
    """
    name, version = parse_spec(spec)
    try:
        group_topic = topics.group_deployment(group)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if canary is not None:
        parse_canary(canary)
    c = connect(broker)
    try:
        states = c.retained(f"{topics.PREFIX}/devices/+/state", quiet=0.5, limit=5.0)
        everyone = group_members(states, group)
        if not everyone:
            raise UsageError(f"group '{group}' has no devices (no retained state message on {broker.url} "
                             f"lists it; devices announce their groups when they connect)")
        if profile is None:
            profiles = {v.profile for v in everyone.values()}
            profile = profiles.pop() if len(profiles) == 1 else None
        entry = resolve(c, name, version, profile, None, group)
        members = {d: v for d, v in everyone.items() if v.profile == entry.profile}
        if not members:
            raise UsageError(f"group '{group}' has no device with profile '{entry.profile}'")
        canaries = select_canaries(members, canary) if canary is not None else []
        if canary is not None and not canaries:
            raise RolloutHalted(f"no device of group '{group}' is online to act as a canary "
                                f"({len(members)} offline); nothing was deployed")
        ro = Rollout(name, version, entry.sha256, members, canaries, gate or Gate())
        feed = _Feed(c)
        on_change(ro)
        published: list[str] = []
        for d in canaries:
            if ro.devices[d].state == "pending":
                dep = Deployment(name=name, version=version, sha256=entry.sha256, profile=entry.profile,
                                 deployed_at=_now_iso())
                c.publish(topics.device_topic(d, "deployment"), encode(dep), retain=True)
                published.append(d)
        c.flush()
        end = time.monotonic() + timeout
        verdict, reason = ro.canary_verdict(time.monotonic())
        while verdict == "wait" and time.monotonic() < end:
            _pump(feed, ro, 0.5, on_change)
            verdict, reason = ro.canary_verdict(time.monotonic())
        if verdict != "ok":
            ro.phase = "halted"
            now = time.monotonic()
            ro.reason = reason or (f"canaries not healthy within {timeout:g}s: " + ", ".join(
                f"{d} {ro.devices[d].state}" for d in canaries if ro.device_health(d, now)[0] != "ok"))
            _rollback_canaries(c, feed, ro, published, on_change)
            return ro
        dep = Deployment(name=name, version=version, sha256=entry.sha256, profile=entry.profile,
                         deployed_at=_now_iso())
        c.publish(group_topic, encode(dep), retain=True)
        c.flush()
        # the canaries now follow the group deployment (same artifact): drop their device pins
        for d in published:
            c.publish(topics.device_topic(d, "deployment"), b"", retain=True)
        c.flush()
        ro.phase = "promoted"
        on_change(ro)
        if not wait:
            ro.phase = "done"
            return ro
        end = time.monotonic() + timeout
        rest, fails, _ = ro.rest_verdict(time.monotonic())
        while rest == "wait" and time.monotonic() < end:
            _pump(feed, ro, 0.5, on_change)
            rest, fails, _ = ro.rest_verdict(time.monotonic())
        if rest == "wait":
            ro.phase, ro.reason = "incomplete", f"devices still updating after {timeout:g}s"
        elif fails:
            ro.phase, ro.reason = "failed", "; ".join(fails)
        else:
            ro.phase = "done"
        on_change(ro)
        return ro
    finally:
        c.close()


class RolloutDisplay:
    """Progress on stderr: a live table on a terminal, else one line per device change."""

    def __init__(self, title: str = "rollout", live: bool | None = None) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        if not self.console.is_terminal:
            self.console = Console(stderr=True, width=160)
        self.title = title
        self.live_on = self.console.is_terminal if live is None else live
        self._live: Any = None
        self._seen: dict[str, tuple[Any, ...]] = {}

    def __enter__(self) -> RolloutDisplay:
        if self.live_on:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def table(self, ro: Rollout) -> Any:
        from rich.table import Table

        t = Table(title=f"{self.title}: {ro.name} {ro.version} ({ro.phase})")
        for col in ("device", "role", "online", "state", "progress", "p95 new/old ms", "reason"):
            t.add_column(col)
        for d, v in sorted(ro.devices.items(), key=lambda kv: (kv[1].role != "canary", kv[0])):
            p95 = f"{v.p95_ms:.3f}/{v.current_p95_ms:.3f}" if v.p95_ms is not None and v.current_p95_ms is not None \
                else (f"{v.p95_ms:.3f}/-" if v.p95_ms is not None else "")
            state = v.state if v.online or v.state in ("HEALTHY", "ROLLED_BACK") else f"{v.state} (offline)"
            color = "green" if v.state in ("ACTIVE", "HEALTHY") else "red" if v.state in ("ROLLED_BACK", "REJECTED", "FAILED") else "yellow"
            t.add_row(d, v.role, "yes" if v.online else "no", f"[{color}]{state}[/{color}]",
                      f"{v.progress * 100:.0f}%" if v.progress is not None else "", p95, v.reason[:80])
        return t

    def __call__(self, ro: Rollout) -> None:
        if self._live is not None:
            self._live.update(self.table(ro))
            return
        for d, v in sorted(ro.devices.items()):
            key = (v.state, v.online, v.rolled_back, ro.phase)
            if self._seen.get(d) != key:
                self._seen[d] = key
                extra = ""
                if v.state == "ACTIVE" and v.p95_ms is not None:
                    extra = f" p95 {v.p95_ms:.3f} ms" + (f" (replaced model: {v.current_p95_ms:.3f} ms)"
                                                         if v.current_p95_ms is not None else "")
                self.console.print(f"[{ro.phase}] {d} ({v.role}{'' if v.online else ', offline'}): {v.state}{extra}"
                                   + (f" - {v.reason}" if v.reason else ""), highlight=False, markup=False)
