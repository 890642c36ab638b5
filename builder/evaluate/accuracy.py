"""Output quality of a candidate versus the fp32 reference and (for classifiers) the labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from agent.runtime.base import InferenceSession


def run_batched(session: InferenceSession, input_name: str, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch):
        for k, v in session.infer({input_name: x[i : i + batch]}).items():
            parts.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def torch_outputs(module: Any, x: np.ndarray, names: tuple[str, ...], batch: int = 256) -> dict[str, np.ndarray]:
    import torch

    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    module.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = module(torch.from_numpy(x[i : i + batch]))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for n, o in zip(names, outs, strict=True):
                parts[n].append(o.numpy().astype(np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], labels: npt.NDArray[np.int64] | None, task: str
) -> dict[str, Any]:
    """Metrics of ``outputs`` against the reference; top-1 figures for classifiers with labels."""
    m: dict[str, Any] = {}
    name = next(iter(reference))
    ref, out = reference[name].reshape(len(reference[name]), -1), outputs[name].reshape(len(outputs[name]), -1)
    dot = np.sum(ref.astype(np.float64) * out, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    m["cosine_min"] = round(float(cos.min()), 6)
    m["cosine_mean"] = round(float(cos.mean()), 6)
    m["max_abs_err"] = float(max(np.max(np.abs(reference[k] - outputs[k])) for k in reference))
    if task == "classification":
        ref_top, out_top = ref.argmax(1), out.argmax(1)
        m["top1_agreement"] = round(float(np.mean(ref_top == out_top)), 6)
        if labels is not None:
            m["top1_ref"] = round(float(np.mean(ref_top == labels)), 6)
            m["top1"] = round(float(np.mean(out_top == labels)), 6)
            m["top1_drop_pt"] = round((m["top1_ref"] - m["top1"]) * 100, 3)
    return m
