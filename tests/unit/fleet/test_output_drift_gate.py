"""The canary gate's opt-in output-drift check (`deploy --canary N --max-output-drift X`): the
canary's predicted classes on the new model against the old model's on the rest of the group,
fed as synthetic telemetry (no broker)."""

from __future__ import annotations

import pytest

from agent.protocol import topics
from fleet.rollout.output_drift import js_divergence
from fleet.rollout.policy import DeviceView, Gate, Rollout
from tests.fleet_helpers import dumps, event, monitor, telemetry

NEW, OLD = "a" * 64, "b" * 64


def rollout(gate: Gate, n: int = 3) -> Rollout:
    devs = {f"d{i}": DeviceView(f"d{i}", online=True, active_sha=OLD) for i in range(n)}
    return Rollout("tiny", "1.1.0", NEW, devs, ["d0"], gate)


def feed_window(ro: Rollout, dev: str, seq: int, sha: str, classes: dict[str, int]) -> None:
    doc = telemetry(dev, seq, sha=sha, monitor=monitor(0.02, classes=classes))
    ro.feed(topics.device_topic(dev, "telemetry"), dumps(doc), now=seq)


def active_canary(ro: Rollout) -> None:
    ro.feed(topics.device_topic("d0", "events"), dumps(event("d0", 1, "ACTIVE", sha=NEW)), now=0)


def test_js_divergence_is_bounded_symmetric_and_zero_for_equal_shapes() -> None:
    a, b = {"0": 10.0, "1": 30.0}, {"0": 100.0, "1": 300.0}
    assert js_divergence(a, b) == pytest.approx(0.0)
    assert js_divergence({"0": 1.0}, {"1": 1.0}) == pytest.approx(1.0)  # disjoint: the maximum
    c = {"0": 30.0, "1": 10.0}
    assert js_divergence(a, c) == pytest.approx(js_divergence(c, a)) and 0 < js_divergence(a, c) < 1
    assert js_divergence({}, a) == 0.0


def test_canary_predicting_like_the_old_model_passes() -> None:
    ro = rollout(Gate(observe_s=0, max_output_drift=0.25, min_output_samples=100))
    active_canary(ro)
    verdict, reason = ro.canary_verdict(0)
    assert verdict == "wait" and "waiting for class counts" in reason  # shown on a timeout
    for k in range(3):
        feed_window(ro, "d0", 10 + k, NEW, {"0": 12, "1": 30})
        feed_window(ro, "d1", 10 + k, OLD, {"0": 13, "1": 29})
        feed_window(ro, "d2", 10 + k, OLD, {"0": 11, "1": 31})
    assert ro.canary_verdict(5) == ("ok", "")


def test_canary_whose_classes_depart_from_the_old_model_halts_naming_both_figures() -> None:
    ro = rollout(Gate(observe_s=0, max_output_drift=0.25, min_output_samples=100))
    active_canary(ro)
    feed_window(ro, "d0", 5, OLD, {"0": 100})  # before its switch: not the new model's output
    for k in range(3):
        feed_window(ro, "d0", 10 + k, NEW, {"0": 2, "1": 40})
        feed_window(ro, "d1", 10 + k, OLD, {"0": 35, "1": 7})
    verdict, reason = ro.canary_verdict(5)
    assert verdict == "fail" and reason.startswith("d0: output drift: class distribution JS")
    assert "> 0.25 allowed" in reason
    assert "class 0: 5% on the canary vs 83% on the old model" in reason
    assert "126 vs 126 predictions" in reason
    assert ro.needs_rollback("d0")


def test_without_the_flag_class_counts_are_not_judged() -> None:
    ro = rollout(Gate(observe_s=0))
    active_canary(ro)
    feed_window(ro, "d0", 10, NEW, {"1": 500})
    feed_window(ro, "d1", 10, OLD, {"0": 500})
    assert ro.canary_verdict(1) == ("ok", "")


def test_no_not_yet_updated_reference_keeps_the_gate_waiting() -> None:
    ro = rollout(Gate(observe_s=0, max_output_drift=0.25, min_output_samples=10), n=1)
    active_canary(ro)
    feed_window(ro, "d0", 10, NEW, {"0": 50})
    verdict, reason = ro.canary_verdict(1)
    assert verdict == "wait" and "0 from not-yet-updated members" in reason
