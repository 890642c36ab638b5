"""Small, verified edits of a .tflite flatbuffer: free the batch dimension, name the I/O tensors.

litert-torch lowers ``flatten``/``view`` with a symbolic batch badly (the jax bridge needs
concrete shapes), so the export pass converts at a fixed, unusual batch size and then turns
that size into -1 wherever a RESHAPE names it; the pass then checks the result against torch
at several batch sizes, so an edit that was wrong fails loudly instead of shipping.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np


def _load(buf: bytes) -> Any:
    from ai_edge_litert import schema_py_generated as s

    return s.ModelT.InitFromObj(s.Model.GetRootAsModel(buf, 0))


def _save(model: Any) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1 << 16)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _builtin(model: Any, op: Any) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return int(max(code.builtinCode, code.deprecatedBuiltinCode))


@functools.cache
def _op_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as s

    return {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}


def op_name(model: Any, op: Any) -> str:
    """The builtin operator type of ``op`` (RESHAPE, CONV_2D...), "CUSTOM" for a custom one."""
    return _op_names().get(_builtin(model, op), "CUSTOM")


def free_batch(
    buf: bytes, batch: int, input_names: Sequence[str], output_names: Sequence[str]
) -> tuple[bytes, int]:
    """Replace the fixed ``batch`` by -1 in RESHAPE shapes and shape signatures; rename the I/O.

    Returns the new model and how many RESHAPE shapes were changed.
    """
    from ai_edge_litert import schema_py_generated as s

    model = _load(buf)
    changed = 0
    for sub in model.subgraphs:
        for op in sub.operators:
            if _builtin(model, op) != s.BuiltinOperator.RESHAPE:
                continue
            if len(op.inputs) > 1 and op.inputs[1] >= 0:
                t = sub.tensors[op.inputs[1]]
                data = model.buffers[t.buffer].data
                if data is not None and t.type == s.TensorType.INT32:
                    shape = np.frombuffer(bytes(bytearray(data)), dtype=np.int32).copy()
                    if shape.size and shape[0] == batch:
                        shape[0] = -1
                        model.buffers[t.buffer].data = np.frombuffer(shape.tobytes(), np.uint8)
                        changed += 1
            opts = op.builtinOptions
            if (
                isinstance(opts, s.ReshapeOptionsT)
                and opts.newShape is not None
                and len(opts.newShape)
                and opts.newShape[0] == batch
            ):
                opts.newShape[0] = -1
        for t in sub.tensors:
            if t.shape is not None and len(t.shape) and t.shape[0] == batch:
                sig = (
                    list(t.shapeSignature)
                    if t.shapeSignature is not None and len(t.shapeSignature)
                    else list(t.shape)
                )
                sig[0] = -1
                t.shapeSignature = sig
        for idx, name in zip(sub.inputs, input_names, strict=False):
            sub.tensors[idx].name = name
        for idx, name in zip(sub.outputs, output_names, strict=False):
            sub.tensors[idx].name = name
    return _save(model), changed


def op_counts(buf: bytes) -> dict[str, int]:
    """Operator type -> number of operators in the model (for the compression report)."""
    model = _load(buf)
    out: dict[str, int] = {}
    for sub in model.subgraphs:
        for op in sub.operators:
            n = op_name(model, op)
            out[n] = out.get(n, 0) + 1
    return out


def prefix_models(buf: bytes) -> list[tuple[str, bytes]]:
    """For k = 0..n: the model cut after its first k operators (output: the k-th op's output).

    Timing each prefix gives each operator's share of the latency by difference (LiteRT's
    Python API has no per-op profiler). Returns (op type of the k-th op, or "" for k = 0, model).
    """
    base = _load(buf)
    n = len(base.subgraphs[0].operators)
    out = []
    for k in range(n + 1):
        model = _load(buf)
        sub = model.subgraphs[0]
        ops = sub.operators
        sub.operators = ops[:k]
        sub.outputs = [ops[k - 1].outputs[0]] if k else [sub.inputs[0]]
        model.signatureDefs = None
        out.append((op_name(model, ops[k - 1]) if k else "", _save(model)))
    return out
