"""Per-layer quantization sensitivity: the output error when only one layer is quantized.

For every Conv/Gemm/MatMul node of an fp32 ONNX model, quantize that node alone (static
QDQ int8, the same settings as the quantize pass) and compare the model's outputs on a few
eval samples with the fp32 outputs: SQNR in dB (higher is better) and max abs error. Layers
whose SQNR falls below a threshold are the ones to keep in float.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtime import load_session

QUANTIZABLE = ("Conv", "Gemm", "MatMul")


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - actual) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


def layer_sensitivity(
    model: Path, calibration: Any, samples: Any, *, per_channel: bool = True,
    activation_uint8: bool = True,
) -> list[dict[str, Any]]:
    """One entry per quantizable node, most sensitive (lowest SQNR) first."""
    import onnx
    from onnxruntime import quantization as q

    from builder.passes.quantize import CalibrationReader

    nodes = [(n.name, n.op_type) for n in onnx.load(str(model)).graph.node if n.op_type in QUANTIZABLE and n.name]
    with load_session("onnxruntime", model) as s:
        feeds = samples.feeds(0, samples.n) if samples.batchable else samples.feeds(0, 1)
        ref = s.infer(feeds)
    out_name = next(iter(ref))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, op in nodes:
            dst = Path(tmp) / f"{len(results)}.onnx"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                q.quantize_static(
                    str(model), str(dst), CalibrationReader(calibration), quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=q.QuantType.QUInt8 if activation_uint8 else q.QuantType.QInt8,
                    weight_type=q.QuantType.QInt8, nodes_to_quantize=[name],
                )
            with load_session("onnxruntime", dst) as s:
                got = s.infer(feeds)[out_name]
            err = float(np.max(np.abs(ref[out_name].astype(np.float64) - np.asarray(got, np.float64))))
            results.append({"node": name, "op": op, "sqnr_db": round(sqnr_db(ref[out_name], np.asarray(got)), 2),
                            "max_abs_err": err})
    return sorted(results, key=lambda r: r["sqnr_db"])
