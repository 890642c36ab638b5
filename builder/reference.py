"""The reference profile packed into every artifact (reference.json): what "normal" looks like.

From the chosen candidate's inputs and outputs on the eval data: per numeric input a bounded
summary (mean/std per feature, per channel or per group of features, at most MAX_FEATURES)
and a value histogram whose edges are reference quantiles; per float output the same
histogram; for classifiers the class distribution, top-1 probability and margin histograms
and a default low-confidence threshold; the non-finite output rate; default drift
thresholds. The agent's monitor (agent.monitor) bins live traffic on exactly these edges, so
only counts per bin are needed on the device. Torch-free: numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

REFERENCE_FILE = "reference.json"
REFERENCE_VERSION = 1
BINS = 20  # histogram bins: edges at the reference's 5%, 10%, ... 95% quantiles
MAX_FEATURES = 64  # per-feature summaries beyond this are per channel or per feature group
MAX_VALUES = 200_000  # values per tensor the quantiles are taken on (a strided subsample)
# Defaults the agent uses unless its [monitor] config overrides them. 0.25 is the usual
# "significant shift" PSI threshold (0.1: moderate).
DRIFT_THRESHOLD = 0.25
DRIFT_WINDOWS = 2
MIN_COUNT = 50
LOW_CONFIDENCE_QUANTILE = 0.05
# reference.json stays well under this (20 bins and 64 features per tensor, tensors capped).
MAX_TENSORS = 32
MAX_BYTES = 256 * 1024

Array = npt.NDArray[Any]


def _values(a: Array) -> npt.NDArray[np.float64]:
    """Finite values of ``a`` as float64, a strided subsample past MAX_VALUES."""
    flat = np.asarray(a).reshape(-1)
    if flat.size > MAX_VALUES:
        flat = flat[:: -(-flat.size // MAX_VALUES)]
    v = flat.astype(np.float64)
    return v[np.isfinite(v)]


def histogram(values: Array, bins: int = BINS) -> dict[str, Any]:
    """Inner edges at the reference quantiles (ties merged) and the reference share per bin.

    Bin i holds values v with edges[i-1] <= v < edges[i] (np.searchsorted side="right"); the
    outer bins are open, so every value lands in one. The agent bins with the same rule.
    """
    v = _values(values)
    if v.size == 0:
        return {"edges": [], "probs": [1.0]}
    qs = np.quantile(v, np.arange(1, bins) / bins)
    edges = np.unique(qs)
    counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=edges.size + 1)
    return {
        "edges": [float(e) for e in edges],
        "probs": [round(float(c) / v.size, 6) for c in counts],
    }


def _feature_summary(a: Array) -> dict[str, Any]:
    """Mean/std per feature (samples on axis 0), per channel (axis 1) when there are more than
    MAX_FEATURES features, or per contiguous group of features when there are more channels."""
    x = np.asarray(a, dtype=np.float64)
    if x.ndim <= 1:
        x = x.reshape(-1, 1)
    n = x.shape[0]
    feats = int(np.prod(x.shape[1:]))
    if feats <= MAX_FEATURES:
        g, by = x.reshape(n, feats), "feature"
    elif x.ndim > 2 and x.shape[1] <= MAX_FEATURES:
        g, by = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]), "channel"
    else:
        flat = x.reshape(n, feats)
        groups = np.array_split(np.arange(feats), MAX_FEATURES)
        g = np.stack([flat[:, ix].mean(axis=1) for ix in groups], axis=1)
        by = "group"
    with np.errstate(invalid="ignore"):
        mean, std = np.nanmean(g, axis=0), np.nanstd(g, axis=0)
    return {
        "by": by,
        "mean": [round(float(m), 6) for m in np.nan_to_num(mean)],
        "std": [round(float(s), 6) for s in np.nan_to_num(std)],
    }


def _is_probabilities(y: npt.NDArray[np.float64]) -> bool:
    """Rows already a probability distribution (in [0, 1], summing to 1), or logits."""
    if y.size == 0 or np.min(y) < 0 or np.max(y) > 1:
        return False
    return bool(np.allclose(y.sum(axis=-1), 1.0, atol=1e-3))


def softmax(y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    z = np.exp(y - np.max(y, axis=-1, keepdims=True))
    out: npt.NDArray[np.float64] = z / z.sum(axis=-1, keepdims=True)
    return out


def _classes(y: Array) -> dict[str, Any]:
    """Class distribution, top-1 probability and margin histograms, low-confidence default."""
    s = np.asarray(y, dtype=np.float64)
    s = s.reshape(-1, s.shape[-1]) if s.ndim else s.reshape(1, 1)
    s = s[np.all(np.isfinite(s), axis=1)]
    probs_in = _is_probabilities(s)
    p = s if probs_in else softmax(s)
    k = p.shape[1]
    top = np.sort(p, axis=1)[:, ::-1]
    top1 = top[:, 0]
    margin = top1 - top[:, 1] if k > 1 else top1
    pred = np.argmax(p, axis=1)
    dist = np.bincount(pred, minlength=k) / max(1, p.shape[0])
    return {
        "count": k,
        "probabilities": probs_in,  # False: the agent applies a softmax to the scores
        "distribution": [round(float(d), 6) for d in dist],
        "top1": histogram(top1),
        "margin": histogram(margin),
        "low_confidence": round(float(np.quantile(top1, LOW_CONFIDENCE_QUANTILE)), 6)
        if top1.size
        else 0.0,
        "mean_confidence": round(float(top1.mean()), 6) if top1.size else 0.0,
    }


def build_reference(
    inputs: dict[str, Array], outputs: dict[str, Array], task: str
) -> dict[str, Any]:
    """The reference profile of a model on its eval data (samples on axis 0 of every array).

    Bool and non-numeric inputs have no summary; only float outputs get a histogram. For a
    classifier the first output holds the class scores (as the golden self-test assumes).
    """
    ref: dict[str, Any] = {"version": REFERENCE_VERSION, "bins": BINS}
    ins: dict[str, Any] = {}
    for name, a in list(inputs.items())[:MAX_TENSORS]:
        a = np.asarray(a)
        if a.dtype.kind not in "fiu":
            continue
        ins[name] = {
            "dtype": str(a.dtype),
            "count": int(a.shape[0]) if a.ndim else 1,
            "summary": _feature_summary(a),
            "hist": histogram(a),
        }
    outs: dict[str, Any] = {}
    non_finite = 0
    rows = 0
    for name, a in list(outputs.items())[:MAX_TENSORS]:
        a = np.asarray(a)
        if a.dtype.kind != "f":
            continue
        r = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
        non_finite += int(np.sum(~np.all(np.isfinite(r), axis=1)))
        rows = max(rows, r.shape[0])
        outs[name] = {"dtype": str(a.dtype), "hist": histogram(a)}
    ref["inputs"] = ins
    ref["outputs"] = outs
    ref["non_finite_rate"] = round(non_finite / rows, 6) if rows else 0.0
    defaults: dict[str, Any] = {
        "metric": "psi",
        "drift_threshold": DRIFT_THRESHOLD,
        "drift_windows": DRIFT_WINDOWS,
        "min_count": MIN_COUNT,
    }
    if task == "classification" and outputs:
        first = next(iter(outputs))
        if np.asarray(outputs[first]).dtype.kind == "f":
            ref["classes"] = {"output": first, **_classes(outputs[first])}
            defaults["low_confidence"] = ref["classes"]["low_confidence"]
    ref["defaults"] = defaults
    return ref


def encode_reference(ref: dict[str, Any]) -> bytes:
    """reference.json's bytes (sorted keys, no NaN); refuses a profile over MAX_BYTES."""
    import json

    data = json.dumps(ref, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_BYTES:
        raise ValueError(f"reference profile is {len(data)} bytes, over {MAX_BYTES}")
    return data
