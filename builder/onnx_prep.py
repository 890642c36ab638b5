"""Make an ONNX model ready to quantize: weights as initializers, opset >= 13, shapes inferred.

Third-party exports often hold their weights in Constant nodes (the quantizers look for
initializers: ``quantize_dynamic`` then fails with "Expected ... to be an initializer" and
``quantize_static`` quantizes only activations), or declare an opset below 13, where
DequantizeLinear has no ``axis`` and per-channel QDQ is invalid. :func:`prepare_onnx` fixes
both, then runs onnxruntime's quantization pre-process (shape inference and constant
folding). It never changes the model's inputs: names, element types (int64 ids, bool masks
stay so) and dynamic dimensions are checked before the prepared model is returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError

log = logging.getLogger(__name__)

# DequantizeLinear gained ``axis`` (per-channel) in opset 13.
MIN_QUANT_OPSET = 13
_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def constants_to_initializers(model: Any) -> int:
    """Move the main graph's Constant nodes that hold a numeric tensor into initializers.

    Returns how many were moved. Sparse and string constants stay nodes.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    keep, moved = [], 0
    for node in graph.node:
        attr = (
            node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        )
        if (
            node.domain not in ("", "ai.onnx")
            or attr is None
            or attr.name not in _CONSTANT_VALUE_ATTRS
        ):
            keep.append(node)
            continue
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            tensor = value
            tensor.name = node.output[0]
        else:
            dtype = np.float32 if attr.name.startswith("value_float") else np.int64
            tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def name_nodes(model: Any) -> int:
    """Give every unnamed main-graph node a unique name (node lists and sensitivity key on names)."""
    taken = {n.name for n in model.graph.node}
    named = 0
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: Any, target: int = MIN_QUANT_OPSET) -> Any:
    """The model at opset ``target`` when it declares a lower one (onnx's version converter)."""
    from onnx import version_converter

    if default_opset(model) >= target:
        return model
    try:
        return version_converter.convert_version(model, target)
    except Exception as exc:
        raise ModelError(
            f"cannot upgrade the model from opset {default_opset(model)} to {target}: {exc}"
        ) from None


def input_signature(model: Any) -> dict[str, tuple[int, tuple[str | int | None, ...]]]:
    """Graph input name -> (element type, dims: int, a symbolic name, or None when unknown)."""
    inits = {i.name for i in model.graph.initializer}
    sig = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = tuple(
            d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim
        )
        sig[inp.name] = (tt.elem_type, dims)
    return sig


def check_same_inputs(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    """Raise unless ``after`` keeps every input of ``before`` with its type and dynamic dims."""
    for name, (etype, dims) in before.items():
        if name not in after:
            raise ModelError(f"{what} dropped the model input '{name}'")
        etype2, dims2 = after[name]
        if etype2 != etype:
            raise ModelError(
                f"{what} changed the element type of input '{name}' ({etype} -> {etype2})"
            )
        fixed = [
            i
            for i, (a, b) in enumerate(zip(dims, dims2, strict=False))
            if not isinstance(a, int) and isinstance(b, int)
        ]
        if len(dims2) != len(dims) or fixed:
            raise ModelError(f"{what} changed the shape of input '{name}' ({dims} -> {dims2})")


@contextlib.contextmanager
def _in_scratch_dir() -> Iterator[None]:
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _pre_process(src: Path, dst: Path) -> str:
    """onnxruntime's quantization pre-process; symbolic shape inference first, plain ONNX's if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts: list[tuple[str, dict[str, bool]]] = [
        ("symbolic", {}),
        ("onnx", {"skip_symbolic_shape": True}),
        ("onnx, unoptimized", {"skip_symbolic_shape": True, "skip_optimization": True}),
    ]
    last: Exception | None = None
    src, dst = src.resolve(), dst.resolve()
    for label, kwargs in attempts:
        try:
            # The pre-process leaves temp files (sym_shape_infer_temp.onnx, *.data) in the
            # working directory when a step fails: run it from a scratch one.
            with _in_scratch_dir(), contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(src), str(dst), **kwargs)
            return label
        except Exception as exc:  # each fallback does less; the last failure is reported
            log.info("quant_pre_process (%s) failed: %s", label, exc)
            last = exc
    raise ModelError(f"quantization pre-process failed: {type(last).__name__}: {last}")


def prepare_onnx(src: Path, dst: Path, *, min_opset: int = MIN_QUANT_OPSET) -> dict[str, Any]:
    """Write the quantization-ready form of ``src`` to ``dst``; return what was done (for the report)."""
    import onnx

    model = onnx.load(str(src))
    before = input_signature(model)
    nodes_before = len(model.graph.node)
    opset_before = default_opset(model)
    moved = constants_to_initializers(model)
    name_nodes(model)
    model = upgrade_opset(model, min_opset)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged.onnx"
        onnx.save(model, str(staged))
        shapes = _pre_process(staged, dst)
    prepared = onnx.load(str(dst), load_external_data=False)
    check_same_inputs(before, input_signature(prepared), "quantization pre-process")
    return {
        "prep_constants_to_initializers": moved,
        "prep_opset": [opset_before, default_opset(prepared)],
        "prep_shape_inference": shapes,
        "prep_nodes": [nodes_before, len(prepared.graph.node)],
    }


def op_mix(model: Any) -> dict[str, int]:
    """How many nodes of each op type the main graph has."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
