"""gate(): a candidate whose accuracy breaks a budget is refused, for every task kind.

The metrics are what builder.evaluate.accuracy.compare gives (some made by calling it on
outputs built to have a known cosine), plus size, latency and peak RSS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol.profile import Budgets, DeviceProfile, load_profile
from builder.candidate import gate
from builder.evaluate.accuracy import compare

BASE = {"model_bytes": 100 * 1024, "latency_b1": {"p95_ms": 1.0}, "peak_rss_mb": 100.0}


def profile(profiles_dir: Path, **budgets: Any) -> DeviceProfile:
    """generic-cpu (2048 KB, 1 pt, 10 ms, 512 MB) with ``budgets`` changed."""
    p = load_profile(profiles_dir / "generic-cpu.toml")
    return p.model_copy(update={"budgets": Budgets(**{**p.budgets.model_dump(), **budgets})})


def metrics(**m: Any) -> dict[str, Any]:
    return {**BASE, **m}


def rotated(cos: float, n: int = 16) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A reference of n 2-d unit vectors and outputs at exactly angle arccos(cos) from each."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    t = np.arccos(cos)
    return (
        {"emb": np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)},
        {"emb": np.stack([np.cos(a + t), np.sin(a + t)], 1).astype(np.float32)},
    )


def test_classification_drop_over_budget(profiles_dir: Path) -> None:
    p = profile(profiles_dir)
    assert gate(metrics(top1_drop_pt=2.5), p, "classification") == ["accuracy drop 2.50 pt > 1 pt"]
    assert gate(metrics(top1_drop_pt=1.0), p, "classification") == []
    # Without labels the drop is bounded by the share of samples whose class changed.
    assert gate(metrics(top1_agreement=0.95), p, "classification") == [
        "accuracy drop 5.00 pt > 1 pt"
    ]
    assert gate(metrics(), p, "classification") == ["no top-1 figure to gate on"]


def test_classification_through_compare(profiles_dir: Path) -> None:
    ref = {"logits": np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]}
    worse = {"logits": np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 0]]}
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    m = compare(ref, worse, labels, "classification")
    assert m["top1_drop_pt"] == 12.5
    assert gate({**BASE, **m}, profile(profiles_dir), "classification") == [
        "accuracy drop 12.50 pt > 1 pt"
    ]
    assert (
        gate({**BASE, **m}, profile(profiles_dir, max_accuracy_drop_pt=15), "classification") == []
    )


@pytest.mark.parametrize("task", ["regression", "embedding"])
def test_min_cosine_under_the_default_budget(task: str, profiles_dir: Path) -> None:
    """Cosine 0.28 is garbage: refused under the default min_cosine 0.99 (the bug that shipped)."""
    p = profile(profiles_dir)
    assert p.budgets.min_cosine == 0.99
    ref, out = rotated(0.28)
    m = compare(ref, out, None, task)
    assert m["cosine_min"] == pytest.approx(0.28, abs=1e-4) and "top1" not in m
    assert gate({**BASE, **m}, p, task) == [f"min cosine {m['cosine_min']:.4f} < 0.99"]
    near = compare(*rotated(0.999), None, task)
    assert gate({**BASE, **near}, p, task) == []


@pytest.mark.parametrize("task", ["regression", "embedding"])
def test_max_abs_and_rel_error_over_budget(task: str, profiles_dir: Path) -> None:
    ref = {"y": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    out = {
        "y": np.array([[1.0, 2.0], [3.0, 4.2]], np.float32)
    }  # cosine ~0.9999, abs err 0.2, rel 0.05
    m = {**BASE, **compare(ref, out, None, task)}
    assert gate(m, profile(profiles_dir), task) == []
    assert gate(m, profile(profiles_dir, max_abs_err=0.1), task) == ["max abs error 0.2 > 0.1"]
    assert gate(m, profile(profiles_dir, max_rel_err=0.01), task) == ["max rel error 0.05 > 0.01"]
    assert gate(m, profile(profiles_dir, max_abs_err=0.3, max_rel_err=0.06), task) == []


@pytest.mark.parametrize("task", ["classification", "regression", "embedding"])
def test_user_metric_drop_over_budget(task: str, profiles_dir: Path) -> None:
    def f1ish(
        outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], labels: Any
    ) -> float:
        return float(np.mean(np.sign(outputs["y"]) == np.sign(reference["y"])))

    ref = {"y": np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]], np.float32)}
    out = {"y": ref["y"] * np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0]], np.float32)}
    labels = np.array([0, 0, 1, 1]) if task == "classification" else None
    m = {**BASE, **compare(ref, out, labels, task, metric=f1ish)}
    assert m["metric_ref"] == 1.0 and m["metric_drop"] == 0.125
    p = profile(profiles_dir, max_accuracy_drop_pt=100, min_cosine=-1)
    assert gate(m, p, task) == ["metric drop 0.125 > 0.01"]
    assert (
        gate(
            m,
            profile(profiles_dir, max_accuracy_drop_pt=100, min_cosine=-1, max_metric_drop=0.2),
            task,
        )
        == []
    )


@pytest.mark.parametrize("task", ["classification", "regression", "embedding"])
def test_integer_output_mismatch(task: str, profiles_dir: Path) -> None:
    """An integer output (a class id, a token) must match fp32 exactly on every sample."""
    ref = {
        "scores": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]],
        "ids": np.array([[1], [2], [3], [4]], np.int64),
    }
    out = {"scores": ref["scores"].copy(), "ids": np.array([[1], [2], [3], [5]], np.int64)}
    labels = np.array([0, 1, 2, 0]) if task == "classification" else None
    m = {**BASE, **compare(ref, out, labels, task)}
    assert m["exact_match"] == 0.75
    assert gate(m, profile(profiles_dir), task) == [
        "integer outputs differ from fp32 on 25.0% of samples"
    ]
    same = {**BASE, **compare(ref, {k: v.copy() for k, v in ref.items()}, labels, task)}
    assert gate(same, profile(profiles_dir), task) == []


def test_integer_only_outputs_have_a_figure_to_gate_on(profiles_dir: Path) -> None:
    ref = {"ids": np.array([[1], [2]], np.int64)}
    m = {**BASE, **compare(ref, {"ids": ref["ids"].copy()}, None, "regression")}
    assert gate(m, profile(profiles_dir), "regression") == []
    assert gate(dict(BASE), profile(profiles_dir), "regression") == [
        "no output error figure to gate on"
    ]


@pytest.mark.parametrize("task", ["classification", "regression", "embedding"])
def test_within_every_budget_is_accepted_and_each_other_budget_is_named(
    task: str, profiles_dir: Path
) -> None:
    p = profile(profiles_dir, max_abs_err=0.5, max_rel_err=0.5)
    ok = metrics(
        top1_drop_pt=0.5,
        cosine_min=0.995,
        cosine_mean=0.999,
        max_abs_err=0.1,
        max_rel_err=0.1,
        exact_match=1.0,
        metric_drop=0.005,
    )
    assert gate(ok, p, task) == []
    bad = {**ok, "model_bytes": 4096 * 1024, "latency_b1": {"p95_ms": 11.0}, "peak_rss_mb": 600.0}
    assert gate(bad, p, task) == [
        "model size 4096.0 KB > 2048 KB",
        "p95 11.000 ms > 10 ms",
        "peak RSS 600.0 MB > 512 MB",
    ]


def test_non_finite_outputs_are_refused(profiles_dir: Path) -> None:
    ref = {"y": np.ones((2, 3), np.float32)}
    out = {"y": np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]], np.float32)}
    m = {**BASE, **compare(ref, out, None, "regression")}
    v = gate(m, profile(profiles_dir, max_abs_err=1.0), "regression")
    assert v[0] == "min cosine -1.0000 < 0.99" and v[1] == "max abs error inf > 1"
