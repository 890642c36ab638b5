"""quantize: static int8 QDQ (calibrated), dynamic int8, or fp16 weights, with onnxruntime tools.

Static QDQ is the fast int8 path on onnxruntime; dynamic int8 is several times slower than
fp32 for convolutions there, so profiles should not pick it for CNNs (the gate catches it).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import DataError, ModelError
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

log = logging.getLogger(__name__)


class QuantizeConfig(PassConfig):
    mode: Literal["static", "dynamic", "fp16"] = "static"
    per_channel: bool = True
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    calibration_samples: int = 256
    # Node names kept in float (too sensitive to quantize).
    nodes_to_exclude: tuple[str, ...] = ()
    # Static only: measure each layer's sensitivity (SQNR when it alone is quantized) and keep
    # in float every layer below this many dB. None: no analysis.
    auto_float_below_sqnr_db: float | None = None


class CalibrationReader:
    """onnxruntime CalibrationDataReader over an array, a chunk at a time."""

    def __init__(self, split: Any, chunk: int = 32) -> None:
        self._it = iter([f for _, _, f in split.batches(chunk)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


class QuantizePass(Pass):
    name = "quantize"
    description = "Quantize an ONNX model: static int8 QDQ, dynamic int8, or fp16"
    config_class = QuantizeConfig
    accepts = (ModelKind.ONNX,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.ONNX

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and model.path is not None and isinstance(config, QuantizeConfig)
        out = ctx.workdir / "model.onnx"
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                precision, extra = self._quantize(model, config, ctx, out)
        except (DataError, ModelError):
            raise
        except Exception as exc:
            raise ModelError(f"quantize ({config.mode}) failed: {type(exc).__name__}: {exc}") from None
        notes: dict[str, Any] = {"quantize_mode": config.mode, **extra}
        if config.mode == "static":
            notes.update(calibration_method=config.method, per_channel=config.per_channel)
        return model.with_file(out, notes, precision)

    @staticmethod
    def _quantize(model: ModelHandle, config: QuantizeConfig, ctx: PassContext, out: Any) -> tuple[str, dict[str, Any]]:
        """Write the quantized model to ``out``; return its precision and notes for the report."""
        from onnxruntime import quantization as q

        assert model.path is not None
        extra: dict[str, Any] = {}
        if config.mode == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            m16 = convert_float_to_float16(onnx.load(str(model.path)), keep_io_types=True)
            onnx.save(m16, str(out))
            return "fp16", extra
        if config.mode == "dynamic":
            q.quantize_dynamic(
                str(model.path), str(out), per_channel=config.per_channel, weight_type=q.QuantType.QInt8
            )
            return "int8_dynamic", extra
        calib = ctx.data.calibration.head(config.calibration_samples)
        if calib.n == 0:
            raise DataError("static quantization needs calibration data")
        pre = ctx.workdir / "preprocessed.onnx"
        try:
            q.quant_pre_process(str(model.path), str(pre), skip_symbolic_shape=True)
            src = pre
        except Exception as exc:  # pre-processing is an optimisation, not a requirement
            log.info("quant_pre_process failed (%s); quantizing the model as is", exc)
            src = model.path
        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }[config.method]
        act = q.QuantType.QUInt8 if config.activation_type == "uint8" else q.QuantType.QInt8
        exclude = list(config.nodes_to_exclude)
        if config.auto_float_below_sqnr_db is not None:
            from builder.evaluate.sensitivity import layer_sensitivity

            sens = layer_sensitivity(Path(src), calib, ctx.data.eval.head(64),
                                     per_channel=config.per_channel, activation_uint8=config.activation_type == "uint8")
            kept = [e["node"] for e in sens if e["sqnr_db"] < config.auto_float_below_sqnr_db]
            exclude += [n for n in kept if n not in exclude]
            extra = {"sensitivity": sens, "kept_float": kept}
        q.quantize_static(
            # Histogram calibrators stack per-batch outputs, so they need equal batches: use 1.
            str(src), str(out), CalibrationReader(calib, 32 if config.method == "minmax" else 1), quant_format=q.QuantFormat.QDQ,
            per_channel=config.per_channel, activation_type=act, weight_type=q.QuantType.QInt8,
            calibrate_method=method, nodes_to_exclude=exclude,
            extra_options={"CalibMaxIntermediateOutputs": 64} if config.method != "minmax" else None,
        )
        pre.unlink(missing_ok=True)
        return "int8_static", extra
