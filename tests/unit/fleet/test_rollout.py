"""The rollout's decision logic against a fake message feed (no broker)."""

from __future__ import annotations

import pytest

from agent.errors import UsageError
from agent.protocol import topics
from agent.protocol.messages import (
    ActiveModel,
    Event,
    LatencyWindow,
    StateMessage,
    Telemetry,
    encode,
)
from fleet.rollout.policy import (
    DeviceView,
    Gate,
    Rollout,
    group_members,
    parse_canary,
    select_canaries,
)

NEW, OLD = "a" * 64, "b" * 64


def state(
    dev: str,
    online: bool = True,
    groups: tuple[str, ...] = ("lab",),
    active: str | None = OLD,
    profile: str = "p",
) -> tuple[str, bytes]:
    am = ActiveModel(name="m", version="1.0.0", sha256=active) if active else None
    msg = StateMessage(
        device=dev,
        online=online,
        agent_version="0",
        profile=profile,
        groups=list(groups),
        active=am,
        seq=1,
        ts=0.0,
    )
    return topics.device_topic(dev, "state"), encode(msg)


def event(
    dev: str, st: str, sha: str = NEW, reason: str = "", **detail: object
) -> tuple[str, bytes]:
    ev = Event(
        device=dev,
        seq=1,
        ts=0.0,
        kind="deployment",
        state=st,
        name="m",
        version="1.1.0",  # type: ignore[arg-type]
        sha256=sha,
        reason=reason,
        detail=dict(detail),
    )
    return topics.device_topic(dev, "events"), encode(ev)


def telemetry(dev: str, active: str, p95: float, errors: int = 0) -> tuple[str, bytes]:
    tm = Telemetry(
        device=dev,
        seq=1,
        ts=0.0,
        interval_s=1,
        uptime_s=1,
        active=ActiveModel(name="m", version="1", sha256=active),
        latency=LatencyWindow(count=10, errors=errors, throughput_per_s=10, p95_ms=p95),
    )
    return topics.device_topic(dev, "telemetry"), encode(tm)


def rollout(n: int = 3, canaries: tuple[str, ...] = ("d0",), gate: Gate | None = None) -> Rollout:
    devs = {f"d{i}": DeviceView(f"d{i}", online=True, active_sha=OLD) for i in range(n)}
    return Rollout("m", "1.1.0", NEW, devs, list(canaries), gate or Gate())


def test_parse_and_select_canaries() -> None:
    assert parse_canary("2") == (2, False) and parse_canary("25%") == (25, True)
    for bad in ("x", "-1", "0%", "150%", "1.5"):
        with pytest.raises(UsageError):
            parse_canary(bad)
    members = group_members(
        dict(
            [
                state("d2"),
                state("d1"),
                state("d0", online=False),
                state("x", groups=("other",)),
                (topics.device_topic("junk", "state"), b"{not json"),
            ]
        ),
        "lab",
    )
    assert sorted(members) == ["d0", "d1", "d2"]
    assert select_canaries(members, "1") == ["d1"]  # offline d0 is skipped
    assert select_canaries(members, "50%") == ["d1", "d2"]  # ceil(3 * 0.5) = 2
    assert select_canaries(members, "1%") == ["d1"]  # at least one
    assert group_members(dict([state("d1", profile="q")]), "lab", profile="p") == {}


def test_healthy_canary_passes_only_after_healthy() -> None:
    ro = rollout()
    assert ro.devices["d0"].role == "canary" and ro.devices["d1"].role == "rest"
    for st in ("FETCHING", "VERIFIED", "SELF_TEST"):
        assert ro.feed(*event("d0", st), now=0)
        assert ro.canary_verdict(0) == ("wait", "")
    ro.feed(*event("d0", "ACTIVE", p95_ms=1.0, current_p95_ms=1.0), now=1)
    assert ro.canary_verdict(100)[0] == "wait"  # no --observe: wait for the end of probation
    ro.feed(*event("d0", "HEALTHY"), now=2)
    assert ro.canary_verdict(2) == ("ok", "")
    # events about another artifact, from another device or garbage change nothing
    assert not ro.feed(*event("d1", "REJECTED", sha=OLD, reason="x"), now=3)
    assert not ro.feed(topics.device_topic("zz", "events"), b"{}", now=3)
    assert not ro.feed(topics.device_topic("d1", "events"), b"\xff", now=3)
    assert ro.devices["d1"].state == "pending"


def test_observe_window_accepts_active_canary() -> None:
    ro = rollout(gate=Gate(observe_s=5))
    ro.feed(*event("d0", "ACTIVE", p95_ms=1.0, current_p95_ms=1.0), now=10)
    assert ro.canary_verdict(14)[0] == "wait"
    assert ro.canary_verdict(15)[0] == "ok"


def test_failures_halt_with_reason() -> None:
    ro = rollout()
    ro.feed(*event("d0", "ROLLED_BACK", reason="self-test failed: y differs"), now=0)
    verdict, reason = ro.canary_verdict(0)
    assert (
        verdict == "fail" and "self-test failed" in reason and reason.startswith("d0: ROLLED_BACK")
    )
    assert not ro.needs_rollback("d0")  # the agent never switched: no rollback command


@pytest.mark.parametrize(
    ("new", "old", "verdict"), [(1.2, 1.0, "ok"), (2.0, 1.0, "fail"), (1.69, 1.0, "ok")]
)
def test_on_device_p95_gate(new: float, old: float, verdict: str) -> None:
    ro = rollout(gate=Gate(max_p95_regression_pct=20, p95_slack_ms=0.5, observe_s=0))
    ro.feed(*event("d0", "ACTIVE", p95_ms=new, current_p95_ms=old), now=0)
    got, reason = ro.canary_verdict(0)
    assert got == verdict
    if verdict == "fail":
        assert "on-device p95 2.000 ms vs 1.000 ms" in reason
        assert ro.needs_rollback("d0")  # it runs the new artifact: the rollout must roll it back


def test_telemetry_is_a_second_source() -> None:
    ro = rollout(gate=Gate(max_p95_regression_pct=10, p95_slack_ms=0, observe_s=0))
    ro.feed(*telemetry("d0", OLD, p95=2.0), now=0)  # before: the old model's p95
    ro.feed(*event("d0", "ACTIVE"), now=1)  # no p95 in the event (none to compare)
    assert ro.canary_verdict(1)[0] == "ok"
    ro.feed(*telemetry("d0", NEW, p95=3.0), now=2)
    verdict, reason = ro.canary_verdict(2)
    assert verdict == "fail" and "telemetry p95 3.000 ms vs 2.000 ms" in reason
    ro2 = rollout(gate=Gate(observe_s=0))
    ro2.feed(*event("d0", "ACTIVE"), now=0)
    ro2.feed(*telemetry("d0", NEW, p95=1.0, errors=3), now=1)
    assert ro2.canary_verdict(1) == ("fail", "d0: 3 inference errors reported in telemetry")


def test_rest_phase_offline_devices_are_pending() -> None:
    ro = rollout(n=4)
    ro.devices["d3"].online = False
    ro.feed(*event("d0", "HEALTHY"), now=0)
    ro.phase = "promoted"
    assert ro.rest_verdict(0) == ("wait", [], ["d3"])
    ro.feed(*event("d1", "HEALTHY"), now=1)
    ro.feed(*event("d2", "REJECTED", reason="older than the active"), now=1)
    verdict, fails, pending = ro.rest_verdict(1)
    assert (
        verdict == "fail" and fails == ["d2: REJECTED: older than the active"] and pending == ["d3"]
    )
    # a device that comes online later (its birth) is waited for
    ro.feed(*state("d3", online=True), now=2)
    assert ro.devices["d3"].online and ro.rest_verdict(2)[0] == "wait"
    assert ro.summary()["pending"] == []


def test_already_active_devices_count_as_healthy() -> None:
    devs = {"d0": DeviceView("d0", online=True, active_sha=NEW)}
    ro = Rollout("m", "1.1.0", NEW, devs, ["d0"])
    assert ro.canary_verdict(0) == ("ok", "") and not ro.needs_rollback("d0")


def test_canary_still_installing_after_a_halt_is_watched_then_rolled_back() -> None:
    """Past VERIFIED the agent finishes the install whatever it receives: a halt must watch it."""
    ro = rollout(canaries=("d0", "d1"))
    ro.feed(*event("d0", "FETCHING"), now=0)
    ro.feed(*event("d1", "SELF_TEST"), now=0)
    assert not ro.installing("d0") and ro.installing("d1")  # a fetch is cancelled by clearing
    assert not ro.needs_rollback("d1")
    ro.feed(*event("d1", "ACTIVE", p95_ms=1.0, current_p95_ms=1.0), now=1)
    assert not ro.installing("d1") and ro.needs_rollback("d1")
    ro.devices["d1"].rolled_back = True
    assert not ro.needs_rollback("d1")
