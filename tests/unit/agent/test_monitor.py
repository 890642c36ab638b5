"""Drift monitor: sketches, PSI/JS on known values, episodes, the telemetry block's shape."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agent.monitor.drift import END_RATIO, Episode, js, psi
from agent.monitor.monitor import Monitor
from agent.monitor.sketch import MAX_VALUES_PER_CALL, Histogram
from agent.protocol.messages import Event, Telemetry
from builder.reference import build_reference


def test_histogram_bins_like_the_builder() -> None:
    h = Histogram([0.0, 1.0], [0.25, 0.5, 0.25])
    h.add(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]))
    assert h.take().tolist() == [1, 2, 3]  # edges go right; NaN sorts last
    assert h.counts.tolist() == [0, 0, 0]
    h.add(np.zeros(10 * MAX_VALUES_PER_CALL))
    assert h.counts.sum() == MAX_VALUES_PER_CALL  # a large tensor is subsampled
    with pytest.raises(ValueError):
        Histogram([0.0], [1.0])


def test_psi_known_values() -> None:
    ref = np.array([0.5, 0.5])
    assert psi(ref, np.array([50, 50])) == 0.0
    want = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(ref, np.array([90, 10])) == pytest.approx(want)
    assert psi(ref, np.array([0, 0])) == 0.0
    assert math.isfinite(psi(ref, np.array([100, 0])))  # an empty bin is smoothed


def test_js_known_values() -> None:
    assert js([1, 0], [0, 1]) == pytest.approx(math.log(2))  # disjoint: the bound
    assert js([0.5, 0.5], [5, 5]) == 0.0  # normalised
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    want = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert js(p, q) == pytest.approx(want)
    assert js(p, q) == pytest.approx(js(q, p))
    assert js([0, 0], [1, 0]) == 0.0


def test_episode_once_per_episode_with_hysteresis_and_min_count() -> None:
    e = Episode(threshold=0.25, windows=2, min_count=10)
    assert e.update(100, 0.3) is None
    assert e.update(5, 0.01) is None  # too few: does not break the streak
    assert e.update(100, 0.4) == "start" and e.drifting
    assert [e.update(100, 0.5) for _ in range(5)] == [None] * 5  # once per episode
    below_threshold_not_hysteresis = 0.25 * (1 + END_RATIO) / 2
    assert e.update(100, below_threshold_not_hysteresis) is None
    assert e.update(100, below_threshold_not_hysteresis) is None and e.drifting
    assert e.update(100, 0.01) is None
    assert e.update(100, 0.3) is None  # a spike resets the streak
    assert e.update(100, 0.01) is None
    assert e.update(100, 0.01) == "end" and not e.drifting
    assert e.update(100, 0.3) is None and e.update(100, 0.3) == "start"


def test_episode_needs_consecutive_windows() -> None:
    e = Episode(threshold=0.25, windows=3, min_count=1)
    assert [e.update(10, s) for s in (0.3, 0.3, 0.1, 0.3, 0.3)] == [None] * 5
    assert e.update(10, 0.3) == "start"


def _classifier_monitor(**kw: Any) -> tuple[Monitor, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    ref = build_reference({"x": x}, {"y": x @ w}, "classification")
    return Monitor(ref, **kw), w


def test_block_shape_in_distribution_then_drift_event() -> None:
    mon, w = _classifier_monitor(min_count=20)
    rng = np.random.default_rng(1)
    assert mon.window() is None  # nothing observed: no block
    for _ in range(3):
        for _ in range(200):
            x = rng.standard_normal((1, 8)).astype(np.float32)
            mon.observe({"x": x}, {"y": x @ w})
        b = mon.window()
        assert b is not None
        assert set(b) == {
            "count",
            "metric",
            "drift",
            "classes",
            "mean_confidence",
            "low_confidence_rate",
            "non_finite",
            "drifting",
        }
        assert b["count"] == 200 and b["metric"] == "psi" and b["non_finite"] == 0
        assert set(b["drift"]) == {"inputs", "outputs", "classes", "max"}
        assert b["drift"]["max"] < 0.1 and not b["drifting"]
        assert sum(b["classes"].values()) == 200 and set(b["classes"]) <= {"0", "1", "2"}
        assert 0 < b["mean_confidence"] <= 1 and b["low_confidence_rate"] < 0.2
    assert mon.take_events() == []
    Telemetry(
        device="d",
        seq=1,
        ts=0,
        interval_s=1,
        uptime_s=1,
        latency={"count": 0, "throughput_per_s": 0},
        monitor=b,
    )  # type: ignore[arg-type]
    for i in range(3):
        for _ in range(200):
            x = (rng.standard_normal((1, 8)) * 3).astype(np.float32)
            mon.observe({"x": x}, {"y": x @ w})
        b = mon.window()
        assert b is not None and b["drift"]["inputs"]["x"] > 0.25
        assert b["drifting"] is (i >= 1)
    (ev,) = mon.take_events()
    assert ev["reason"].startswith("drift: ") and "> 0.25 (2 windows)" in ev["reason"]
    assert ev["detail"]["threshold"] == 0.25 and ev["detail"]["windows"] == 2
    assert ev["detail"]["scores"]["max"] > 0.25
    Event(device="d", seq=1, ts=0, kind="drift", reason=ev["reason"], detail=ev["detail"])
    for _ in range(2):
        for _ in range(200):
            x = rng.standard_normal((1, 8)).astype(np.float32)
            mon.observe({"x": x}, {"y": x @ w})
        mon.window()
    (end,) = mon.take_events()
    assert end["reason"].startswith("drift ended")


def test_regression_block_has_no_class_keys_and_counts_non_finite() -> None:
    x = np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32)
    mon = Monitor(build_reference({"x": x}, {"y": x * 2}, "regression"))
    bad = np.array([[1.0, np.nan, 0, 0], [1, 1, 1, 1]], np.float32)
    mon.observe({"x": x[:2]}, {"y": bad})
    b = mon.window()
    assert b is not None and b["count"] == 2 and b["non_finite"] == 1
    assert "classes" not in b and "classes" not in b["drift"] and "mean_confidence" not in b


def test_config_overrides_artifact_defaults_and_sampling_bounds_cost() -> None:
    mon, w = _classifier_monitor(threshold=0.5, windows=3, min_count=7, max_overhead=0.05)
    assert (mon.threshold, mon.episode.windows, mon.episode.min_count) == (0.5, 3, 7)
    x = np.ones((1, 8), np.float32)
    for _ in range(1000):
        mon.offer({"x": x}, {"y": x @ w}, infer_s=1e-7)  # a "free" model: sampled sparsely
    sampled = mon.count
    assert 1 <= sampled < 1000
    mon.window()
    for _ in range(100):
        mon.offer({"x": x}, {"y": x @ w}, infer_s=1.0)  # a slow model: every call
    assert mon.count == 100


def test_broken_observation_never_raises() -> None:
    mon, _ = _classifier_monitor()
    mon.offer({"x": np.ones((1, 8), np.float32)}, {"y": "not an array"}, 1.0)  # type: ignore[dict-item]
    assert mon.nbytes < 5 * 2**20
