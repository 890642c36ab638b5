"""Per-layer quantization sensitivity: the output error when only one layer is quantized.

For every Conv/Gemm/MatMul node with a weight in an fp32 ONNX model, quantize that node
alone (static QDQ int8, the same settings as the quantize pass) and compare every float
output of the model on a few eval samples with the fp32 outputs: SQNR in dB (higher is
better; the worst output counts) and max abs error. Layers whose SQNR falls below a
threshold are the ones to keep in float.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime import load_session

QUANTIZABLE = ("Conv", "Gemm", "MatMul")
Feeds = dict[str, np.ndarray]


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - actual) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def compare_outputs(
    reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]
) -> tuple[float, float]:
    """(lowest SQNR in dB, largest max abs error) over every float output of ``reference``."""
    worst_sqnr, worst_err = float("inf"), 0.0
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating):
            continue  # integer outputs (class ids, counts) have no meaningful SQNR
        got = np.asarray(actual[name], np.float64)
        worst_sqnr = min(worst_sqnr, sqnr_db(ref, got))
        worst_err = max(worst_err, float(np.max(np.abs(ref.astype(np.float64) - got), initial=0.0)))
    return worst_sqnr, worst_err


def layer_sensitivity(
    model: Path,
    calibration: Sequence[Feeds],
    samples: Feeds,
    *,
    per_channel: bool = True,
    activation_uint8: bool = True,
) -> list[dict[str, Any]]:
    """One entry per quantizable node with a weight, most sensitive (lowest SQNR) first.

    ``calibration`` is a list of feeds (one dict per batch, every model input); ``samples``
    is one feed the outputs are compared on.
    """
    import onnx
    from onnxruntime import quantization as q

    from builder.passes.quantize import CalibrationReader, weighted_nodes

    graph_model = onnx.load(str(model))
    ops = {n.name: n.op_type for n in graph_model.graph.node}
    nodes = [(name, ops[name]) for name in weighted_nodes(graph_model, QUANTIZABLE) if name]
    with load_session("onnxruntime", model) as s:
        ref = s.infer(samples)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, op in nodes:
            dst = Path(tmp) / f"{len(results)}.onnx"
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                q.quantize_static(
                    str(model),
                    str(dst),
                    CalibrationReader(list(calibration)),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=q.QuantType.QUInt8 if activation_uint8 else q.QuantType.QInt8,
                    weight_type=q.QuantType.QInt8,
                    nodes_to_quantize=[name],
                    op_types_to_quantize=list(QUANTIZABLE),
                )
            with load_session("onnxruntime", dst) as s:
                got = s.infer(samples)
            sqnr, err = compare_outputs(ref, got)
            results.append({"node": name, "op": op, "sqnr_db": round(sqnr, 2), "max_abs_err": err})
    return sorted(results, key=lambda r: r["sqnr_db"])
