"""The reference profile: quantile edges, bounded summaries, classifier statistics, size cap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder.reference import (
    BINS,
    MAX_BYTES,
    MAX_FEATURES,
    build_reference,
    encode_reference,
    histogram,
)


def test_histogram_edges_are_quantiles_and_bins_hold_equal_shares() -> None:
    v = np.random.default_rng(0).standard_normal(10_000)
    h = histogram(v)
    assert len(h["edges"]) == BINS - 1
    assert np.allclose(h["probs"], 1 / BINS, atol=1e-3)
    assert abs(h["edges"][BINS // 2 - 1]) < 0.05  # the median
    assert sum(h["probs"]) == pytest.approx(1.0, abs=1e-5)


def test_histogram_merges_tied_quantiles() -> None:
    v = np.r_[np.zeros(900), np.arange(1, 101)]  # 90% zeros: most quantiles are 0
    h = histogram(v)
    assert len(h["edges"]) == len(set(h["edges"]))
    assert h["probs"][0] == 0.0 and h["probs"][1] == pytest.approx(0.9)


def test_histogram_of_nothing_finite_is_one_bin() -> None:
    assert histogram(np.array([np.nan, np.inf])) == {"edges": [], "probs": [1.0]}


def test_summaries_are_bounded() -> None:
    rng = np.random.default_rng(1)
    ref = build_reference(
        {
            "small": rng.standard_normal((50, 8)).astype(np.float32),
            "image": rng.standard_normal((20, 3, 32, 32)).astype(np.float32),
            "wide": rng.standard_normal((20, 5000)).astype(np.float32),
            "mask": np.ones((20, 4), bool),
        },
        {"y": rng.standard_normal((50, 3)).astype(np.float32)},
        "regression",
    )
    ins = ref["inputs"]
    assert ins["small"]["summary"]["by"] == "feature" and len(ins["small"]["summary"]["mean"]) == 8
    assert ins["image"]["summary"]["by"] == "channel" and len(ins["image"]["summary"]["std"]) == 3
    assert ins["wide"]["summary"]["by"] == "group"
    assert len(ins["wide"]["summary"]["mean"]) == MAX_FEATURES
    assert "mask" not in ins  # bool: no summary
    assert "classes" not in ref and "low_confidence" not in ref["defaults"]
    assert ref["defaults"]["metric"] == "psi" and ref["defaults"]["drift_threshold"] == 0.25
    assert len(encode_reference(ref)) < MAX_BYTES


def test_classifier_logits_get_a_softmax_and_a_low_confidence_default() -> None:
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((400, 4)) * 3
    logits[:, 2] += 2  # class 2 most often predicted
    ref = build_reference({"x": rng.standard_normal((400, 4))}, {"y": logits}, "classification")
    c = ref["classes"]
    assert c["output"] == "y" and c["count"] == 4 and c["probabilities"] is False
    assert int(np.argmax(c["distribution"])) == 2
    assert sum(c["distribution"]) == pytest.approx(1.0, abs=1e-5)
    p = np.exp(logits - logits.max(1, keepdims=True))
    top1 = (p / p.sum(1, keepdims=True)).max(1)
    assert c["low_confidence"] == pytest.approx(np.quantile(top1, 0.05), abs=1e-5)
    assert ref["defaults"]["low_confidence"] == c["low_confidence"]
    assert 0 < c["mean_confidence"] <= 1


def test_classifier_probabilities_are_taken_as_they_are() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]] * 10)
    ref = build_reference({"x": np.zeros((20, 2))}, {"p": p}, "classification")
    assert ref["classes"]["probabilities"] is True
    assert ref["classes"]["mean_confidence"] == pytest.approx(0.75)


def test_non_finite_rate_and_json_without_nan() -> None:
    y = np.ones((10, 2), np.float32)
    y[3, 1] = np.nan
    ref = build_reference({"x": np.zeros((10, 2), np.float32)}, {"y": y}, "regression")
    assert ref["non_finite_rate"] == pytest.approx(0.1)
    json.loads(encode_reference(ref))
