"""export_onnx: torch module -> single-file ONNX with a dynamic batch axis, parity-checked."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any, Literal

import numpy as np

from agent.errors import ModelError
from builder.parity import check_parity
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

log = logging.getLogger(__name__)


class ExportOnnxConfig(PassConfig):
    opset: int = 18
    # "auto" tries the torch.export-based exporter first and falls back to the legacy one.
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"
    atol: float = 1e-4
    rtol: float = 1e-3
    parity_samples: int = 64


class ExportOnnxPass(Pass):
    name = "export_onnx"
    description = "Export a torch module to one ONNX file with a dynamic batch axis; parity-checked"
    config_class = ExportOnnxConfig
    accepts = (ModelKind.TORCH,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.ONNX

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        import torch

        assert model is not None and isinstance(config, ExportOnnxConfig)
        out = ctx.workdir / "model.onnx"
        module = model.module
        example = torch.zeros((2, *model.input_shape), dtype=torch.float32)
        errors = []
        used = None
        order = ["dynamo", "legacy"] if config.exporter == "auto" else [config.exporter]
        for exporter in order:
            try:
                self._export(torch, module, example, model, config, exporter, out)
                used = exporter
                break
            except Exception as exc:
                errors.append(f"{exporter}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                log.info("ONNX export with %s failed: %s", exporter, exc)
        if used is None:
            raise ModelError(f"export_onnx failed ({'; '.join(errors)})")
        # Parity: torch vs onnxruntime on real samples.
        x = ctx.data.eval.x[: config.parity_samples]
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        ref_outs = _as_outputs(ref, model.output_names)
        from agent.runtime import load_session

        with load_session("onnxruntime", out, threads=ctx.threads) as sess:
            got = sess.infer({model.input_name: x})
        diffs = check_parity("export_onnx parity (torch vs onnxruntime)", ref_outs, got, config.atol, config.rtol)  # type: ignore[arg-type]
        notes = {"exporter": used, "export_max_abs_diff": max(diffs.values())}
        return model.with_file(out, notes)

    @staticmethod
    def _export(torch: Any, module: Any, example: Any, model: ModelHandle, config: ExportOnnxConfig, exporter: str, out: Any) -> None:
        out_names = list(model.output_names)
        sink = io.StringIO()
        torch_onnx_log = logging.getLogger("torch.onnx")
        level = torch_onnx_log.level
        torch_onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(
                    module, (example,), str(out), dynamo=True, external_data=False,
                    input_names=[model.input_name], output_names=out_names,
                    dynamic_shapes=({0: batch},), opset_version=config.opset, verbose=False,
                )
            else:
                axes = {n: {0: "batch"} for n in [model.input_name, *out_names]}
                torch.onnx.export(
                    module, (example,), str(out), dynamo=False,
                    input_names=[model.input_name], output_names=out_names,
                    dynamic_axes=axes, opset_version=min(config.opset, 17),
                )
        torch_onnx_log.setLevel(level)


def _as_outputs(ref: Any, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if isinstance(ref, (tuple, list)):
        return {n: r.detach().numpy() for n, r in zip(names, ref, strict=True)}
    return {names[0]: ref.detach().numpy()}
