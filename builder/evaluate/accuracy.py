"""Output quality of a candidate versus the fp32 reference and (for classifiers) the labels.

Every output is compared, sample by sample: cosine similarity (min and mean), max absolute
error, and max error relative to the reference's largest magnitude; integer and bool outputs
must match exactly. Classifiers add top-1 against the labels; a user metric adds its value
for the reference and the candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.runtime.base import InferenceSession
from builder.data import Feeds, Split, collect_outputs

UserMetric = Callable[[Feeds, Feeds, Any], float]


def run_batched(
    session: InferenceSession, split: Split, batch_axes: Mapping[str, int | None], batch: int = 64
) -> Feeds:
    parts = [session.infer(f) for _, _, f in split.batches(batch)]
    return collect_outputs(parts, batch_axes)


def _per_sample(a: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def output_errors(reference: Feeds, outputs: Feeds) -> dict[str, dict[str, float]]:
    """Per output: min/mean cosine, max abs error, max relative error (or exact-match rate)."""
    res: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        got = outputs.get(name)
        if got is None or got.shape != ref.shape:
            raise ValueError(
                f"output {name}: shape {None if got is None else got.shape} differs from the "
                f"reference's {ref.shape}"
            )
        if ref.dtype.kind in "biu":
            res[name] = {"exact_match": float(np.mean(_per_sample(ref) == _per_sample(got)))}
            continue
        r, g = _per_sample(ref), _per_sample(got)
        if not np.all(np.isfinite(g)):
            res[name] = {
                "cosine_min": -1.0,
                "cosine_mean": -1.0,
                "max_abs_err": float("inf"),
                "max_rel_err": float("inf"),
                "non_finite": int(np.sum(~np.isfinite(g))),
            }
            continue
        dot = np.sum(r * g, axis=1)
        norms = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
        # Two all-zero vectors are identical; one zero vector against a non-zero one is not.
        both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(g, axis=1) == 0)
        cos = np.where(norms > 0, dot / np.maximum(norms, 1e-300), np.where(both_zero, 1.0, 0.0))
        err = float(np.max(np.abs(r - g), initial=0.0))
        scale = float(np.max(np.abs(r), initial=0.0))
        res[name] = {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "max_abs_err": err,
            "max_rel_err": err / scale if scale > 0 else (0.0 if err == 0 else float("inf")),
        }
    return res


def compare(
    reference: Feeds,
    outputs: Feeds,
    labels: npt.NDArray[Any] | None,
    task: str,
    metric: UserMetric | None = None,
    metric_ref: float | None = None,
) -> dict[str, Any]:
    """Metrics of ``outputs`` against the reference (all outputs); top-1 for classifiers."""
    per = output_errors(reference, outputs)
    floats = [v for v in per.values() if "cosine_min" in v]
    m: dict[str, Any] = {}
    if floats:
        m["cosine_min"] = round(min(v["cosine_min"] for v in floats), 6)
        m["cosine_mean"] = round(float(np.mean([v["cosine_mean"] for v in floats])), 6)
        m["max_abs_err"] = max(v["max_abs_err"] for v in floats)
        m["max_rel_err"] = max(v["max_rel_err"] for v in floats)
    exact = [v["exact_match"] for v in per.values() if "exact_match" in v]
    if exact:
        m["exact_match"] = round(min(exact), 6)
    if len(per) > 1:
        m["outputs"] = {k: {a: round(b, 6) for a, b in v.items()} for k, v in per.items()}
    if task == "classification":
        name = next(iter(reference))
        ref_top, out_top = (
            _per_sample(reference[name]).argmax(1),
            _per_sample(outputs[name]).argmax(1),
        )
        m["top1_agreement"] = round(float(np.mean(ref_top == out_top)), 6)
        if labels is not None:
            m["top1_ref"] = round(float(np.mean(ref_top == labels)), 6)
            m["top1"] = round(float(np.mean(out_top == labels)), 6)
            m["top1_drop_pt"] = round((m["top1_ref"] - m["top1"]) * 100, 3)
    if metric is not None:
        value = float(metric(outputs, reference, labels))
        ref_value = (
            float(metric(reference, reference, labels)) if metric_ref is None else metric_ref
        )
        m["metric"] = round(value, 6)
        m["metric_ref"] = round(ref_value, 6)
        m["metric_drop"] = round(ref_value - value, 6)
    return m
