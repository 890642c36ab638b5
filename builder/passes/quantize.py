"""quantize: static int8 QDQ (calibrated), dynamic int8, or fp16, with onnxruntime's tools.

Every int8 mode first prepares the model (builder.onnx_prep: Constant-node weights become
initializers, opset < 13 is upgraded, shapes inferred); the op mix then decides what is
quantized:

- dynamic: MatMul/Gemm/Gather/Attention weights only. ConvInteger is several times slower
  than float Conv in onnxruntime, so convolutions stay float unless ``op_types`` names them;
  a model with nothing else to quantize is an error (the search records the candidate as
  not applicable). ``per_channel`` matters a lot for transformers (MiniLM: min cosine 0.91
  per-tensor, 0.98 per-channel).
- static: on a transformer graph (LayerNormalization, Softmax or Attention beside MatMuls)
  only the MatMul/Gemm nodes with a constant weight are quantized, so LayerNorm, Softmax,
  GELU and the attention matmuls stay float; other graphs get onnxruntime's full QDQ set.
- fp16: float tensors only, float inputs and outputs kept float32; integer inputs (token
  ids, masks) are never cast, and the pass checks it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.errors import DataError, ModelError
from builder.data import Split
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

# Ops whose presence beside MatMuls marks a transformer (their inputs must stay float).
TRANSFORMER_MARKERS = frozenset(
    {
        "LayerNormalization",
        "SkipLayerNormalization",
        "Softmax",
        "Attention",
        "MultiHeadAttention",
        "EmbedLayerNormalization",
    }
)
# Dynamic int8 quantizes these when present (weights as int8, activations quantized at run time).
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention", "EmbedLayerNormalization", "LSTM")
# Static int8 on a transformer: the weight-bearing linear layers and embedding tables only.
TRANSFORMER_STATIC_OPS = ("MatMul", "Gemm", "Conv", "Gather")


class QuantizeConfig(PassConfig):
    mode: Literal["static", "dynamic", "fp16"] = "static"
    per_channel: bool = True
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    calibration_samples: int = 256
    # Op types to quantize; None: chosen from the op mix (see the module docstring).
    op_types: tuple[str, ...] | None = None
    # Op types never quantized (removed from whatever op_types resolves to).
    keep_float_ops: tuple[str, ...] = ()
    # Static only: quantize a MatMul only when its weight is a constant (activation x activation
    # products such as attention scores stay float). None: on for transformer graphs.
    matmul_const_weight_only: bool | None = None
    # Static only: quantize the outputs of the quantized ops too (chains int8 between them).
    # None: off for transformer graphs, where the next op (LayerNorm, GELU, attention) is float
    # anyway and an output QDQ only adds error.
    quantize_outputs: bool | None = None
    # Static only: SmoothQuant alpha (needs neural-compressor installed). None: off.
    smooth_quant_alpha: float | None = None
    # Node names kept in float (too sensitive to quantize).
    nodes_to_exclude: tuple[str, ...] = ()
    # Static only: measure each layer's sensitivity (SQNR when it alone is quantized) and keep
    # in float every layer below this many dB. None: no analysis.
    auto_float_below_sqnr_db: float | None = None


class CalibrationReader:
    """onnxruntime CalibrationDataReader over a list of feeds (one dict per batch)."""

    def __init__(self, batches: list[Feeds]) -> None:
        self._batches = batches
        self._it = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def split_batches(split: Split, samples: int, size: int) -> list[Feeds]:
    """The first ``samples`` samples of ``split`` as feeds of at most ``size`` samples."""
    return [f for _, _, f in split.head(samples).batches(size)]


def _iter_nodes(model: Any) -> Iterator[Any]:
    yield from model.graph.node


def is_transformer(mix: dict[str, int]) -> bool:
    """LayerNorm/Softmax/Attention beside more MatMul/Gemm than convolutions."""
    linear = mix.get("MatMul", 0) + mix.get("Gemm", 0)
    conv = mix.get("Conv", 0) + mix.get("ConvTranspose", 0)
    return linear > conv and any(op in mix for op in TRANSFORMER_MARKERS)


def weighted_nodes(model: Any, op_types: tuple[str, ...]) -> list[str]:
    """Names of nodes of ``op_types`` with at least one initializer input (a weight to quantize)."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in _iter_nodes(model)
        if n.op_type in op_types and any(i in inits for i in n.input)
    ]


def unround_float_consumers(model: Any, quantized: set[str]) -> int:
    """Feed nodes left in float the original tensor instead of its quantize-dequantize copy.

    onnxruntime rewires every consumer of a quantized activation to the dequantized copy, so
    a LayerNorm output going to a quantized MatMul and to the residual Add would reach the
    Add rounded to int8. A pair after a quantized node (a Gather's int8 rows) stays: the
    runtime fuses it into an int8 op. Returns how many inputs were restored.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    restored = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or name in outputs:
                continue
            qn = producers.get(dq.input[0])
            if qn is None or qn.op_type != "QuantizeLinear":
                continue  # a weight's DequantizeLinear, not an activation pair
            source = producers.get(qn.input[0])
            if source is None or source.name not in quantized:
                node.input[i] = qn.input[0]
                restored += 1
    return restored


class QuantizePass(Pass):
    name = "quantize"
    description = "Quantize an ONNX model: static int8 QDQ, dynamic int8, or fp16"
    config_class = QuantizeConfig
    accepts = (ModelKind.ONNX,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.ONNX

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and model.path is not None and isinstance(config, QuantizeConfig)
        done = _quantized_ops(model.path)
        if done:
            raise ModelError(
                f"quantize ({config.mode}): the model is already quantized ({', '.join(done)} nodes); "
                "give the fp32 model"
            )
        out = ctx.workdir / "model.onnx"
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                precision, extra = self._quantize(model, config, ctx, out)
        except (DataError, ModelError):
            raise
        except Exception as exc:
            raise ModelError(
                f"quantize ({config.mode}) failed: {type(exc).__name__}: {exc}"
            ) from None
        notes: dict[str, Any] = {"quantize_mode": config.mode, **extra}
        if config.mode != "fp16":
            notes["per_channel"] = config.per_channel
        if config.mode == "static":
            notes["calibration_method"] = config.method
        return model.with_file(out, notes, precision)

    def _quantize(
        self, model: ModelHandle, config: QuantizeConfig, ctx: PassContext, out: Path
    ) -> tuple[str, dict[str, Any]]:
        """Write the quantized model to ``out``; return its precision and notes for the report."""
        import onnx

        from builder.onnx_prep import op_mix, prepare_onnx

        assert model.path is not None
        if config.mode == "fp16":
            return "fp16", self._fp16(model.path, out)
        src = ctx.workdir / "prepared.onnx"
        extra: dict[str, Any] = prepare_onnx(model.path, src)
        prepared = onnx.load(str(src))
        mix = op_mix(prepared)
        transformer = is_transformer(mix)
        extra["transformer_graph"] = transformer
        try:
            if config.mode == "dynamic":
                extra.update(self._dynamic(src, prepared, mix, config, out))
                return "int8_dynamic", extra
            extra.update(self._static(model, src, prepared, mix, transformer, config, ctx, out))
            return "int8_static", extra
        finally:
            src.unlink(missing_ok=True)

    @staticmethod
    def _resolve_ops(default: tuple[str, ...], config: QuantizeConfig) -> tuple[str, ...]:
        ops = config.op_types if config.op_types is not None else default
        return tuple(op for op in ops if op not in config.keep_float_ops)

    def _dynamic(
        self, src: Path, prepared: Any, mix: dict[str, int], config: QuantizeConfig, out: Path
    ) -> dict[str, Any]:
        from onnxruntime import quantization as q

        ops = self._resolve_ops(DYNAMIC_OPS, config)
        if not weighted_nodes(prepared, ops):
            top = ", ".join(f"{k} {v}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1])[:6])
            raise ModelError(
                f"dynamic int8: no weighted {'/'.join(ops)} node to quantize (op mix: {top}); "
                "convolutions are faster as static int8 or float"
            )
        q.quantize_dynamic(
            str(src),
            str(out),
            per_channel=config.per_channel,
            weight_type=q.QuantType.QInt8,
            op_types_to_quantize=list(ops),
            nodes_to_exclude=list(config.nodes_to_exclude),
        )
        return {"quantized_op_types": list(ops)}

    def _static(
        self,
        model: ModelHandle,
        src: Path,
        prepared: Any,
        mix: dict[str, int],
        transformer: bool,
        config: QuantizeConfig,
        ctx: PassContext,
        out: Path,
    ) -> dict[str, Any]:
        from onnxruntime import quantization as q
        from onnxruntime.quantization.registry import QDQRegistry

        # Histogram calibrators stack per-batch outputs, so they need equal batches: use 1.
        batch = 32 if config.method == "minmax" else 1
        calib = split_batches(ctx.data.calibration, config.calibration_samples, batch)
        if not calib:
            raise DataError("static quantization needs calibration data")
        ops = self._resolve_ops(
            TRANSFORMER_STATIC_OPS if transformer else tuple(QDQRegistry), config
        )
        const_b = (
            transformer
            if config.matmul_const_weight_only is None
            else config.matmul_const_weight_only
        )
        outputs = not transformer if config.quantize_outputs is None else config.quantize_outputs
        extra: dict[str, Any] = {
            "quantized_op_types": [op for op in ops if op in mix],
            "matmul_const_weight_only": const_b,
            "quantize_outputs": outputs,
        }
        # onnxruntime honours MatMulConstBOnly only outside QDQ: name the nodes to quantize instead.
        only = weighted_nodes(prepared, ops) if const_b else None
        exclude = list(config.nodes_to_exclude)
        if config.auto_float_below_sqnr_db is not None:
            from builder.evaluate.sensitivity import layer_sensitivity

            samples = next(ctx.data.eval.head(64).batches(64))[2]
            sens = layer_sensitivity(
                src,
                calib,
                samples,
                per_channel=config.per_channel,
                activation_uint8=config.activation_type == "uint8",
            )
            kept = [e["node"] for e in sens if e["sqnr_db"] < config.auto_float_below_sqnr_db]
            exclude += [n for n in kept if n not in exclude]
            extra.update(sensitivity=sens, kept_float=kept)
        options: dict[str, Any] = {"MatMulConstBOnly": const_b}
        if not outputs:
            # Gather keeps its output QDQ: onnxruntime then gathers int8 rows and dequantizes
            # only those, instead of dequantizing the whole embedding table on every run.
            options["OpTypesToExcludeOutputQuantization"] = [op for op in ops if op != "Gather"]
        if config.method != "minmax":
            options["CalibMaxIntermediateOutputs"] = 64
        if config.smooth_quant_alpha is not None:
            options.update(SmoothQuant=True, SmoothQuantAlpha=config.smooth_quant_alpha)
        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }[config.method]
        act = q.QuantType.QUInt8 if config.activation_type == "uint8" else q.QuantType.QInt8
        q.quantize_static(
            str(src),
            str(out),
            CalibrationReader(calib),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=list(ops),
            nodes_to_quantize=only,
            per_channel=config.per_channel,
            activation_type=act,
            weight_type=q.QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=exclude,
            extra_options=options,
        )
        if only is not None:
            import onnx

            quantized = onnx.load(str(out))
            extra["float_consumers_unrounded"] = unround_float_consumers(
                quantized, set(only) - set(exclude)
            )
            onnx.save(quantized, str(out))
        return extra

    @staticmethod
    def _fp16(src: Path, out: Path) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from builder.onnx_prep import check_same_inputs, input_signature

        model = onnx.load(str(src))
        before = input_signature(model)
        # keep_io_types converts only float32 inputs/outputs at the boundary; int64/bool inputs
        # keep their type (checked below, since a wrong cast would only show at serving time).
        m16 = convert_float_to_float16(model, keep_io_types=True)
        check_same_inputs(before, input_signature(m16), "fp16 conversion")
        onnx.save(m16, str(out))
        return {}


_QUANT_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
)


def _quantized_ops(path: Path) -> list[str]:
    """Quantization op types already in the model at ``path`` (empty for a float model)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return sorted(ops & set(_QUANT_OPS))
