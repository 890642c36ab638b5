"""Model preparation and quantization on tiny graphs made with onnx.helper.

Covers what broke on third-party and transformer models: Constant-node weights at opset 12,
several inputs of int64/float dtypes, dynamic axes beyond batch, and fp16 with integer inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import ModelError
from agent.runtime import load_session
from builder.data import DataBundle, Split
from builder.evaluate.sensitivity import layer_sensitivity
from builder.onnx_prep import (
    constants_to_initializers,
    default_opset,
    input_signature,
    prepare_onnx,
)
from builder.passes import ModelHandle, ModelKind, PassContext, get_pass

rng = np.random.default_rng(0)


def const(name: str, a: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(a.astype(np.float32), name)
    )


def conv_opset12(path: Path) -> Path:
    """An opset-12 CNN (dynamic batch, height, width) whose conv weights are Constant nodes."""
    nodes = [
        const("w1", rng.normal(0, 0.3, (8, 3, 3, 3))),
        const("b1", rng.normal(0, 0.1, (8,))),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        const("w2", rng.normal(0, 0.3, (1, 8, 1, 1))),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Sigmoid", ["c2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def text_encoder(path: Path, layer_norm: bool = True) -> Path:
    """Two inputs, ids int64 [n, seq] and a float mask [n, seq]: embedding Gather, attention-like
    Softmax over an activation x activation MatMul, LayerNorm, and two weighted MatMuls."""
    d, vocab = 16, 50
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in [
            ("emb", rng.normal(0, 1, (vocab, d))),
            ("wq", rng.normal(0, 0.3, (d, d))),
            ("wo", rng.normal(0, 0.3, (d, 4))),
            ("gamma", np.ones(d)),
            ("beta", np.zeros(d)),
        ]
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("Unsqueeze", ["mask", "ax"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("MatMul", ["em", "wq"], ["q"]),
        helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "qt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "em"], ["ctx"]),
    ]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "ax"))
    if layer_norm:
        nodes.append(
            helper.make_node("LayerNormalization", ["ctx", "gamma", "beta"], ["ln"], axis=-1)
        )
    else:
        nodes.append(helper.make_node("Identity", ["ctx"], ["ln"]))
    nodes += [
        helper.make_node("MatMul", ["ln", "wo"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "enc",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["n", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def StandInSplit(inputs: dict[str, np.ndarray]) -> Split:
    """The builder's own Split over these arrays (no labels)."""
    return Split(dict(inputs), None, "test")


StandInData = DataBundle


def text_feeds(n: int, seq: int = 12) -> dict[str, np.ndarray]:
    mask = (rng.random((n, seq)) < 0.8).astype(np.float32)
    mask[:, 0] = 1
    return {"ids": rng.integers(0, 50, (n, seq)).astype(np.int64), "mask": mask}


def image_feeds(n: int) -> dict[str, np.ndarray]:
    return {"x": rng.normal(0, 1, (n, 3, 16, 20)).astype(np.float32)}


def handle(path: Path) -> ModelHandle:
    """A ModelHandle for the ONNX file ``path``, its inputs and outputs as the file declares them."""
    from builder.passes.load import onnx_io

    inputs, outputs = onnx_io(path)
    return ModelHandle(
        kind=ModelKind.ONNX,
        digest="test",
        path=path,
        inputs=tuple(inputs),
        output_names=tuple(o.name for o in outputs),
    )


def quantize(
    path: Path, cfg: dict[str, Any], tmp: Path, feeds: dict[str, np.ndarray]
) -> ModelHandle:
    tmp.mkdir(parents=True, exist_ok=True)
    split = StandInSplit(feeds)
    ctx = PassContext(workdir=tmp, data=cast(Any, StandInData(eval=split, calibration=split)))
    p = get_pass("quantize")
    return p.run(handle(path), p.config_class.model_validate(cfg), ctx)


def infer(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with load_session("onnxruntime", path) as s:
        return np.asarray(next(iter(s.infer(feeds).values())))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_constants_become_initializers() -> None:
    node = helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0])
    keep = helper.make_node("Identity", ["k"], ["y"])
    g = helper.make_graph(
        [node, keep], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
    )
    m = helper.make_model(g)
    assert constants_to_initializers(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Identity"]
    assert numpy_helper.to_array(m.graph.initializer[0]).tolist() == [1.0, 2.0]


def test_prepare_opset12_constant_weights(tmp_path: Path) -> None:
    src = conv_opset12(tmp_path / "det.onnx")
    notes = prepare_onnx(src, tmp_path / "prep.onnx")
    prepared = onnx.load(str(tmp_path / "prep.onnx"))
    assert notes["prep_constants_to_initializers"] == 3 and notes["prep_opset"] == [12, 13]
    assert default_opset(prepared) >= 13 and "Constant" not in ops(tmp_path / "prep.onnx")
    assert {i.name for i in prepared.graph.initializer} >= {"w1", "w2"}
    assert input_signature(prepared) == input_signature(onnx.load(str(src)))  # n, h, w stay dynamic
    x = image_feeds(2)
    np.testing.assert_allclose(infer(tmp_path / "prep.onnx", x), infer(src, x), atol=1e-5)


def test_opset12_constant_weights_quantize_static_per_channel(tmp_path: Path) -> None:
    src = conv_opset12(tmp_path / "det.onnx")
    q = quantize(src, {"mode": "static", "per_channel": True}, tmp_path / "q", image_feeds(16))
    assert q.path is not None and q.precision == "int8_static"
    model = onnx.load(str(q.path))
    deq_axis = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]
    assert deq_axis, "conv weights are per-channel"
    int8_weights = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert {tuple(i.dims) for i in int8_weights} >= {
        (8, 3, 3, 3),
        (1, 8, 1, 1),
    }  # the weights, not only activations
    x = image_feeds(4)  # another height and width than calibration: still dynamic
    x["x"] = x["x"][:, :, :12, :8].copy()
    assert cosine(infer(q.path, x), infer(src, x)) > 0.99


def test_dynamic_leaves_convolutions_float_and_says_so(tmp_path: Path) -> None:
    src = conv_opset12(tmp_path / "det.onnx")
    with pytest.raises(ModelError, match=r"no weighted .* node to quantize .*Conv 2"):
        quantize(src, {"mode": "dynamic"}, tmp_path / "d", image_feeds(2))
    q = quantize(src, {"mode": "dynamic", "op_types": ["Conv"]}, tmp_path / "c", image_feeds(2))
    assert q.path is not None and "ConvInteger" in ops(
        q.path
    )  # asked for explicitly: Constant weights are fine now


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_on_two_input_graph(tmp_path: Path, per_channel: bool) -> None:
    src = text_encoder(tmp_path / "enc.onnx")
    q = quantize(
        src, {"mode": "dynamic", "per_channel": per_channel}, tmp_path / "q", text_feeds(4)
    )
    assert q.path is not None and q.notes["per_channel"] is per_channel
    assert "MatMulInteger" in ops(q.path) or "DynamicQuantizeMatMul" in ops(q.path)
    x = text_feeds(3, seq=7)  # another sequence length
    assert cosine(infer(q.path, x), infer(src, x)) > 0.98
    assert input_signature(onnx.load(str(q.path))) == input_signature(onnx.load(str(src)))


def test_static_transformer_keeps_sensitive_ops_float(tmp_path: Path) -> None:
    src = text_encoder(tmp_path / "enc.onnx")
    q = quantize(src, {"mode": "static"}, tmp_path / "q", text_feeds(64))
    assert (
        q.path is not None and q.notes["transformer_graph"] and q.notes["matmul_const_weight_only"]
    )
    model = onnx.load(str(q.path))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert producers.get(node.input[0]) != "DequantizeLinear", (
                f"{node.op_type} input is quantized"
            )
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if producers.get(n.input[1]) == "DequantizeLinear"]
    assert len(matmuls) == 4 and len(quantized) == 2  # the two weighted ones, not q x qT or p x v
    x = text_feeds(8)
    assert cosine(infer(q.path, x), infer(src, x)) > 0.98


def test_static_keep_float_ops_and_explicit_op_types(tmp_path: Path) -> None:
    src = text_encoder(
        tmp_path / "enc.onnx", layer_norm=False
    )  # no LayerNorm, still a Softmax graph
    q = quantize(
        src,
        {
            "mode": "static",
            "op_types": ["MatMul", "Gather"],
            "keep_float_ops": ["Gather"],
            "matmul_const_weight_only": False,
        },
        tmp_path / "q",
        text_feeds(32),
    )
    assert q.notes["quantized_op_types"] == ["MatMul"] and q.path is not None
    model = onnx.load(str(q.path))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(
        producers.get(n.input[0]) != "DequantizeLinear"
        for n in model.graph.node
        if n.op_type == "Gather"
    )
    assert (
        sum(
            producers.get(n.input[0]) == "DequantizeLinear"
            for n in model.graph.node
            if n.op_type == "MatMul"
        )
        == 4
    )


def test_fp16_keeps_int64_input_and_float_io(tmp_path: Path) -> None:
    src = text_encoder(tmp_path / "enc.onnx")
    q = quantize(src, {"mode": "fp16"}, tmp_path / "h", text_feeds(2))
    assert q.path is not None and q.precision == "fp16"
    model = onnx.load(str(q.path))
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input} == {
        "ids": TensorProto.INT64,
        "mask": TensorProto.FLOAT,
    }
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    x = text_feeds(3, seq=5)
    assert cosine(infer(q.path, x), infer(src, x)) > 0.999


def test_sensitivity_takes_feeds_and_compares_every_output(tmp_path: Path) -> None:
    src = text_encoder(tmp_path / "enc.onnx")
    model = onnx.load(str(src))
    model.graph.output.append(
        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", "seq", 4])
    )
    onnx.save(model, str(src))
    prepare_onnx(src, tmp_path / "prep.onnx")  # as the quantize pass does: nodes get names
    feeds = text_feeds(16)
    sens = layer_sensitivity(tmp_path / "prep.onnx", [feeds], text_feeds(4))
    assert sorted(e["op"] for e in sens) == ["MatMul", "MatMul"]  # the weighted ones only
    assert [e["sqnr_db"] for e in sens] == sorted(e["sqnr_db"] for e in sens)
    assert all(np.isfinite(e["sqnr_db"]) and e["max_abs_err"] > 0 for e in sens)
