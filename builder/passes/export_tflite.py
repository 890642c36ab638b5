"""export_tflite: torch module -> .tflite (LiteRT) with litert-torch: fp32, dynamic-range int8 or full int8.

Quantization runs on the converted model with ai-edge-quantizer: ``dynamic`` stores int8
weights and computes in float; ``int8`` calibrates activations on the calibration data and
gives a model whose input and output tensors are int8 too (their scale and zero point go into
the manifest; the LiteRT adapter quantizes and dequantizes at the boundary). The model is
converted at a fixed batch size that is then freed (builder.tflite_edit), and checked against
torch at several batch sizes with named tolerances.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from agent.errors import DataError, ModelError, missing_dependency
from builder.parity import check_parity
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

log = logging.getLogger(__name__)

PRECISION = {"none": "fp32", "dynamic": "int8_dynamic", "int8": "int8_static"}


class ExportTfliteConfig(PassConfig):
    quantization: Literal["none", "dynamic", "int8"] = "none"
    # Batch size the model is traced at; freed to -1 afterwards. Unusual on purpose, so that
    # a 7 in a RESHAPE shape is the batch and not a feature size that happens to be 1 or 2.
    convert_batch: int = Field(default=7, ge=2)
    calibration_samples: int = Field(default=256, ge=1)
    # Parity with torch. fp32: allclose(atol, rtol). Quantized: max |diff| <= quant_atol_frac
    # times the largest |reference| output (int8 rounds every layer), rtol 0.
    atol: float = 1e-4
    rtol: float = 1e-3
    quant_atol_frac: float = 0.25
    parity_samples: int = Field(default=64, ge=1)


def unsupported_operator(message: str) -> str | None:
    """The torch operator a litert-torch error names (``aten.erfinv.default``), if any."""
    m = re.search(r"Lowering not found: (\S+)", message) or re.search(
        r"\b(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", message
    )
    return m.group(1) if m else None


@contextlib.contextmanager
def _quiet() -> Any:
    """litert-torch prints progress bars and absl logs; keep them out of the build output."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


class ExportTflitePass(Pass):
    name = "export_tflite"
    description = "Convert a torch module to .tflite with litert-torch (fp32, dynamic int8 or full int8); parity-checked"
    config_class = ExportTfliteConfig
    accepts = (ModelKind.TORCH,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.TFLITE

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and isinstance(config, ExportTfliteConfig)
        try:
            # Checked with ai-edge-litert only: tflite-runtime 2.14 (the adapter's fallback on
            # devices) gave wrong outputs for a dynamic-range model.
            import ai_edge_litert  # noqa: F401
        except ImportError:
            raise missing_dependency(
                "ai-edge-litert", "builder", "pass 'export_tflite' (to check its models)"
            ) from None
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        ctx.say(f"export_tflite: converting with litert-torch ({config.quantization})")
        float_path = ctx.workdir / "float.tflite"
        self._convert(model, config, float_path, ctx)
        buf = float_path.read_bytes()
        if config.quantization != "none":
            buf = self._quantize(float_path, config, ctx, model.input_names)
        from builder.tflite_edit import free_batch, op_counts

        buf, freed = free_batch(
            buf, config.convert_batch, list(model.input_names), list(model.output_names)
        )
        out = ctx.workdir / "model.tflite"
        out.write_bytes(buf)
        float_path.unlink(missing_ok=True)
        diffs = self._parity(model, config, ctx, out)
        notes: dict[str, Any] = {
            "tflite": {
                "quantization": config.quantization,
                "convert_batch": config.convert_batch,
                "reshapes_freed": freed,
                "ops": op_counts(buf),
                "parity_max_abs_diff": diffs,
            },
        }
        return model.with_file(out, notes, PRECISION[config.quantization])

    @staticmethod
    def _convert(
        model: ModelHandle, config: ExportTfliteConfig, out: Path, ctx: PassContext
    ) -> None:
        try:
            with _quiet():
                import litert_torch
        except ImportError:
            raise missing_dependency("litert-torch", "builder", "pass 'export_tflite'") from None
        from builder.torchio import to_torch

        if not ctx.data.eval.batchable or ctx.data.eval.n < config.convert_batch:
            raise ModelError(
                "export_tflite: needs a model whose inputs all have a batch axis, and "
                f"at least {config.convert_batch} eval samples"
            )
        sample = to_torch(ctx.data.eval.feeds(0, config.convert_batch), model.input_names)
        try:
            with _quiet():
                litert_torch.convert(model.module.eval(), sample).export(str(out))
        except Exception as exc:
            msg = str(exc)
            op = unsupported_operator(msg)
            first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
            what = (
                f"operator {op} has no LiteRT lowering"
                if op
                else f"{type(exc).__name__}: {first[:300]}"
            )
            raise ModelError(
                f"export_tflite: litert-torch cannot convert the model: {what}"
            ) from None

    @staticmethod
    def _quantize(
        float_path: Path, config: ExportTfliteConfig, ctx: PassContext, names: tuple[str, ...]
    ) -> bytes:
        from ai_edge_quantizer import quantizer, recipe

        if config.quantization == "dynamic":
            with _quiet():
                qt = quantizer.Quantizer(str(float_path), recipe.dynamic_wi8_afp32())
                result = qt.quantize()
        else:
            cal = ctx.data.calibration.head(config.calibration_samples)
            b = config.convert_batch
            if cal.n < b:
                raise DataError(
                    f"export_tflite int8: needs at least {b} calibration samples, got {cal.n}"
                )
            with _quiet():
                qt = quantizer.Quantizer(str(float_path), recipe.static_wi8_ai8())
                sig = qt.get_signature_list() if hasattr(qt, "get_signature_list") else None
                name, sig_inputs = _signature(float_path, sig)
                # The converted model's signature names its inputs args_0, args_1, ... in the
                # order the module takes them.
                batches = []
                for i in range(0, cal.n - b + 1, b):
                    f = cal.feeds(i, i + b)
                    # litert-torch lowers int64 inputs to int32 (TFLite's index type).
                    batches.append(
                        {s: _tflite_int(f[n]) for s, n in zip(sig_inputs, names, strict=True)}
                    )
                result = qt.quantize(qt.calibrate({name: batches}))
        data = result.quantized_model
        if data is None:
            raise ModelError(
                f"export_tflite: ai-edge-quantizer produced no model ({config.quantization})"
            )
        return bytes(data)

    @staticmethod
    def _parity(
        model: ModelHandle, config: ExportTfliteConfig, ctx: PassContext, path: Path
    ) -> dict[str, float]:
        """Torch vs LiteRT at batch 1, 3 and ``parity_samples``: the batch really is free."""
        from agent.runtime import load_session
        from builder.torchio import torch_outputs

        x = ctx.data.eval.head(config.parity_samples)
        ref = torch_outputs(
            model.module, x, model.input_names, model.output_names, model.batch_axes
        )
        worst: dict[str, float] = {}
        with load_session("litert", path, threads=ctx.threads) as sess:
            for n in sorted({1, min(3, x.n), x.n}):
                got = {k: np.asarray(v, np.float32) for k, v in sess.infer(x.feeds(0, n)).items()}
                want = {k: v[:n] for k, v in ref.items()}
                if config.quantization == "none":
                    atol, rtol = config.atol, config.rtol
                else:
                    atol, rtol = (
                        config.quant_atol_frac
                        * max(float(np.max(np.abs(v))) for v in ref.values()),
                        0.0,
                    )
                what = f"export_tflite parity (torch vs LiteRT, {config.quantization}, batch {n})"
                for k, d in check_parity(what, want, got, atol, rtol).items():
                    worst[k] = max(worst.get(k, 0.0), d)
        return worst


def _signature(float_path: Path, sig: Any) -> tuple[str, list[str]]:
    """(signature key, its input names in order) of a converted model."""
    if not sig:
        from ai_edge_litert.interpreter import Interpreter

        sig = Interpreter(model_path=str(float_path)).get_signature_list()
    name = next(iter(sig))
    return name, sorted(sig[name]["inputs"], key=lambda s: (len(s), s))


def _tflite_int(a: np.ndarray) -> np.ndarray:
    """int64 values as the int32 a converted model takes (they are token ids, masks, sizes)."""
    if a.dtype == np.int64 and (a.size == 0 or (a.min() >= -(2**31) and a.max() < 2**31)):
        return a.astype(np.int32)
    return a
