"""export_onnx: torch module -> single-file ONNX with a dynamic batch axis, parity-checked."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any, Literal

from agent.errors import ModelError
from builder.parity import check_parity
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext
from builder.torchio import to_torch, torch_outputs

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
        # A real batch of two samples: the dynamo exporter wants a batch >= 2 with a dynamic
        # batch dim, and real token ids / masks keep data-dependent paths honest.
        example = to_torch(next(ctx.data.eval.batches(2))[2], model.input_names)
        errors = []
        used = None
        order = ["dynamo", "legacy"] if config.exporter == "auto" else [config.exporter]
        for exporter in order:
            try:
                self._export(torch, module, example, model, config, exporter, out)
                used = exporter
                break
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                errors.append(f"{exporter}: {type(exc).__name__}: {first}")
                log.info("ONNX export with %s failed: %s", exporter, exc)
        if used is None:
            raise ModelError(f"export_onnx failed ({'; '.join(errors)})")
        renamed = dedupe_value_names(out, set(model.output_names))
        # Parity: torch vs onnxruntime on real samples.
        sample = ctx.data.eval.head(config.parity_samples)
        ref = torch_outputs(module, sample, model.input_names, model.output_names, model.batch_axes)
        from agent.runtime import load_session
        from builder.evaluate.accuracy import run_batched

        with load_session("onnxruntime", out, threads=ctx.threads) as sess:
            got = run_batched(sess, sample, model.batch_axes)
        diffs = check_parity(
            "export_onnx parity (torch vs onnxruntime)", ref, got, config.atol, config.rtol
        )
        notes: dict[str, Any] = {"exporter": used, "export_max_abs_diff": max(diffs.values())}
        if renamed:
            notes["renamed_internal_values"] = renamed
        return model.with_file(out, notes)

    @staticmethod
    def _export(
        torch: Any,
        module: Any,
        example: Any,
        model: ModelHandle,
        config: ExportOnnxConfig,
        exporter: str,
        out: Any,
    ) -> None:
        in_names = list(model.input_names)
        out_names = list(model.output_names)
        # Named dynamic dims: the batch axis of each input and output, plus any the config names.
        axes: dict[str, dict[int, str]] = {}
        for spec in model.inputs:
            for i, d in enumerate(spec.shape):
                if isinstance(d, str):
                    axes.setdefault(spec.name, {})[i] = (
                        "batch" if i == model.batch_axis(spec.name) else d
                    )
        for name in out_names:
            ax = model.batch_axis(name)
            if ax is not None:
                axes.setdefault(name, {})[ax] = "batch"
        sink = io.StringIO()
        torch_onnx_log = logging.getLogger("torch.onnx")
        level = torch_onnx_log.level
        torch_onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed" notes
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    dims: dict[str, Any] = {}

                    def dim(n: str) -> Any:
                        if n not in dims:
                            dims[n] = (
                                torch.export.Dim("batch", min=1, max=4096)
                                if n == "batch"
                                else torch.export.Dim.AUTO
                            )
                        return dims[n]

                    shapes = tuple(
                        {i: dim(n) for i, n in axes.get(s.name, {}).items()} or None
                        for s in model.inputs
                    )
                    torch.onnx.export(
                        module,
                        example,
                        str(out),
                        dynamo=True,
                        external_data=False,
                        input_names=in_names,
                        output_names=out_names,
                        dynamic_shapes=shapes,
                        opset_version=config.opset,
                        verbose=False,
                    )
                else:
                    torch.onnx.export(
                        module,
                        example,
                        str(out),
                        dynamo=False,
                        input_names=in_names,
                        output_names=out_names,
                        dynamic_axes=axes,
                        opset_version=min(config.opset, 17),
                    )
        finally:
            torch_onnx_log.setLevel(level)


def dedupe_value_names(path: Any, names: set[str]) -> list[str]:
    """Rename internal values that reuse an output's name (the dynamo exporter names a
    word-embedding lookup "embedding"; an output called "embedding" then has two definitions
    and onnxruntime refuses the model). The graph output keeps its name; returns what changed."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    last = {}
    for i, node in enumerate(g.node):
        for o in node.output:
            if o in names:
                last[o] = i
    current: dict[str, str] = {}
    changed = []
    for i, node in enumerate(g.node):
        for j, name in enumerate(node.input):
            if name in current:
                node.input[j] = current[name]
        for j, name in enumerate(node.output):
            if name in names and last.get(name) != i:
                new = f"{name}__internal{i}"
                node.output[j] = new
                current[name] = new
                changed.append(name)
            elif name in current:
                del current[name]
    if changed:
        onnx.save(m, str(path))
    return sorted(set(changed))
