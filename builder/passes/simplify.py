"""simplify: fold constants and fuse ops with onnxslim (falls back to onnxruntime's optimizer)."""

from __future__ import annotations

import logging
from typing import Literal

from agent.errors import ModelError
from builder.onnx_prep import check_same_inputs, input_signature
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

log = logging.getLogger(__name__)


class SimplifyConfig(PassConfig):
    engine: Literal["onnxslim", "onnxruntime"] = "onnxslim"


class SimplifyPass(Pass):
    name = "simplify"
    description = "Simplify the ONNX graph (onnxslim, or onnxruntime's offline optimizer)"
    config_class = SimplifyConfig
    accepts = (ModelKind.ONNX,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.ONNX

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and model.path is not None and isinstance(config, SimplifyConfig)
        import onnx

        out = ctx.workdir / "model.onnx"
        before = onnx.load(str(model.path))
        n_before = len(before.graph.node)
        if config.engine == "onnxslim":
            import onnxslim

            try:
                slim = onnxslim.slim(before)
            except Exception as exc:
                raise ModelError(f"simplify: onnxslim failed: {exc}") from None
            onnx.save(slim, str(out))
            n_after = len(slim.graph.node)
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            opts.optimized_model_filepath = str(out)
            ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
            n_after = len(onnx.load(str(out)).graph.node)
        # Folding must not touch the interface: int64 ids stay int64, "seq" stays dynamic.
        check_same_inputs(input_signature(before), input_signature(onnx.load(str(out))), "simplify")
        notes = {"simplify_nodes_before": n_before, "simplify_nodes_after": n_after}
        return model.with_file(out, notes)
