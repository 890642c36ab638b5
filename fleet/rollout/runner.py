"""A staged rollout against the broker: deploy to canaries, judge them (fleet.rollout.policy),
then set the group's deployment, or halt and roll the canaries back."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.broker import BrokerConfig
from agent.errors import RolloutHalted, UsageError
from agent.protocol import topics
from agent.protocol.messages import Command
from agent.protocol.trust import Target
from fleet.deploy import desired, parse_spec, publish_desired, resolve
from fleet.mqtt import Message, SyncClient, connect
from fleet.rollout.policy import (
    PENDING,
    ROLLBACK_FAILED,
    Gate,
    Rollout,
    group_members,
    parse_canary,
    select_canaries,
)
from fleet.trust import Operator


class _Feed:
    """Every message on the watched topics, queued from paho's thread for the rollout loop."""

    PATTERNS = ("state", "events", "telemetry", "cmd/result")

    def __init__(self, c: SyncClient) -> None:
        self.listener = c.listen(
            [(f"{topics.PREFIX}/devices/+/{leaf}", 1) for leaf in self.PATTERNS]
        )

    def get(self, timeout: float) -> Message | None:
        return self.listener.get(timeout)


def _pump(
    feed: _Feed,
    ro: Rollout,
    seconds: float,
    on_change: Callable[[Rollout], None],
    results: dict[str, dict[str, Any]] | None = None,
) -> None:
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


def _send_rollbacks(
    c: SyncClient,
    operator: Operator,
    feed: _Feed,
    ro: Rollout,
    devices: list[str],
    on_change: Callable[[Rollout], None],
    wait_s: float,
) -> None:
    """A rollback command to each of ``devices``; waits (bounded) for their answers."""
    results: dict[str, dict[str, Any]] = {}
    sent: dict[str, str] = {}
    for d in devices:
        cid = f"rollout-{uuid.uuid4().hex[:12]}"
        body = Command(id=cid, op="rollback").model_dump(mode="json", exclude_none=True)
        c.publish(topics.device_topic(d, "cmd"), operator.command(d, body), retain=False)
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
            v.state = ROLLBACK_FAILED
            v.reason = f"rollback command {cid}: " + (
                str(res.get("reason")) if res else f"no answer within {wait_s:g}s"
            )


def _rollback_canaries(
    c: SyncClient,
    operator: Operator,
    feed: _Feed,
    ro: Rollout,
    published: list[str],
    on_change: Callable[[Rollout], None],
    wait_s: float = 20.0,
    late_s: float = 30.0,
) -> None:
    """Roll back canaries that run the new artifact, then clear their device deployments.

    The rollback command comes first: it marks the artifact rejected on the device, so clearing
    the device deployment afterwards falls back to the group's (older, active) deployment
    without the agent fetching anything. A canary that failed its self-test never switched.
    A canary still installing (past VERIFIED the agent finishes the install whatever arrives)
    is watched for up to ``late_s`` and rolled back if it turns ACTIVE.
    """
    _send_rollbacks(
        c, operator, feed, ro, [d for d in ro.canaries if ro.needs_rollback(d)], on_change, wait_s
    )
    for d in published:
        publish_desired(c, operator, Target(device=d), None)
    c.flush()
    end = time.monotonic() + late_s
    while any(ro.installing(d) for d in ro.canaries) and time.monotonic() < end:
        _pump(feed, ro, 0.5, on_change)
    late = [d for d in ro.canaries if ro.needs_rollback(d)]
    if late:
        _send_rollbacks(c, operator, feed, ro, late, on_change, wait_s)
    on_change(ro)


def staged_rollout(
    broker: BrokerConfig,
    spec: str,
    group: str,
    canary: str | None,
    operator: Operator,
    profile: str | None = None,
    gate: Gate | None = None,
    wait: bool = False,
    timeout: float = 600.0,
    on_change: Callable[[Rollout], None] = lambda ro: None,
) -> Rollout:
    """Deploy to canaries, judge them, then set the group's deployment (or halt and roll back).

    Returns the finished Rollout; ``phase`` is done, halted, failed or incomplete. ``timeout``
    bounds each phase (canaries; then the rest of the group with ``wait``).
    """
    name, version = parse_spec(spec)
    try:
        topics.group_deployment(group)  # a usage error before anything is sent
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if canary is not None:
        parse_canary(canary)
    c = connect(broker)
    try:
        states = c.retained(f"{topics.PREFIX}/devices/+/state", quiet=0.5, limit=5.0)
        everyone = group_members(states, group)
        if not everyone:
            raise UsageError(
                f"group '{group}' has no devices (no retained state message on {broker.url} "
                f"lists it; devices announce their groups when they connect)"
            )
        if profile is None:
            profiles = {v.profile for v in everyone.values()}
            profile = profiles.pop() if len(profiles) == 1 else None
        entry = resolve(c, name, version, profile, None, group)
        members = {d: v for d, v in everyone.items() if v.profile == entry.profile}
        if not members:
            raise UsageError(f"group '{group}' has no device with profile '{entry.profile}'")
        canaries = select_canaries(members, canary) if canary is not None else []
        if canary is not None and not canaries:
            raise RolloutHalted(
                f"no device of group '{group}' is online to act as a canary "
                f"({len(members)} offline); nothing was deployed"
            )
        ro = Rollout(name, version, entry.sha256, members, canaries, gate or Gate())
        feed = _Feed(c)
        on_change(ro)
        published: list[str] = []
        dep = desired(c, entry)
        for d in canaries:
            if ro.devices[d].state == PENDING:
                publish_desired(c, operator, Target(device=d), dep)
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
            ro.reason = reason or (
                f"canaries not healthy within {timeout:g}s: "
                + ", ".join(
                    f"{d} {ro.devices[d].state}"
                    for d in canaries
                    if ro.device_health(d, now)[0] != "ok"
                )
            )
            _rollback_canaries(c, operator, feed, ro, published, on_change)
            return ro
        publish_desired(c, operator, Target(group=group), desired(c, entry))
        c.flush()
        # the canaries now follow the group deployment (same artifact): drop their device pins
        for d in published:
            publish_desired(c, operator, Target(device=d), None)
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
