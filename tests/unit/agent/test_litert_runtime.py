"""The LiteRT adapter on real .tflite models (built in code), float and full int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "ai_edge_litert", reason="LiteRT (pip install 'edgefleet[tflite]') is not installed"
)

from agent.runtime import available_runtimes, load_session
from tests.fixtures.tflite_build import fc_model


@pytest.mark.parametrize("int8", [False, True])
def test_litert_adapter_matches_reference(tmp_path: Path, int8: bool) -> None:
    m = fc_model(int8=int8)
    path = tmp_path / "m.tflite"
    path.write_bytes(m.tflite)
    assert "litert" in available_runtimes()
    with load_session("litert", path, threads=1) as s:
        assert [(i.name, i.dtype, i.shape) for i in s.inputs] == [
            ("input", "int8" if int8 else "float32", ("batch", 4))
        ]
        assert s.outputs[0].shape == ("batch", 3)
        rng = np.random.default_rng(1)
        for batch in (1, 5, 2):  # the batch dimension is resized between calls
            x = rng.uniform(-1, 1, (batch, 4)).astype(np.float32)
            y = s.infer({"input": x})["output"]
            assert y.dtype == np.float32 and y.shape == (batch, 3)  # int8 output is dequantized
            tol = m.out_scale if int8 else 1e-5  # one output quantization step
            np.testing.assert_allclose(y, m.reference(x), atol=tol)


def test_int8_inputs_are_quantized_with_the_tensor_scale(tmp_path: Path) -> None:
    m = fc_model(int8=True)
    path = tmp_path / "m.tflite"
    path.write_bytes(m.tflite)
    with load_session("litert", path) as s:
        # Values beyond the int8 range saturate instead of wrapping around.
        x = np.array([[5.0, -5.0, 0.0, 1.0]], np.float32)
        clipped = np.array([[127 * m.in_scale, -128 * m.in_scale, 0.0, 1.0]], np.float32)
        np.testing.assert_allclose(
            s.infer({"input": x})["output"], s.infer({"input": clipped})["output"]
        )


def test_integer_inputs_pass_unchanged_and_any_dynamic_axis_resizes(tmp_path: Path) -> None:
    from agent.serve import Loaded
    from tests.fixtures.tflite_build import int_add_model

    path = tmp_path / "add.tflite"
    path.write_bytes(int_add_model())
    with load_session("litert", path) as s:
        assert [(i.name, i.dtype, i.shape, i.quantized) for i in s.inputs] == [
            ("a", "int32", ("batch", "d1"), False),
            ("b", "int32", ("batch", "d1"), False),
        ]
        # served as int32 (only a quantized int8 tensor faces float32 callers)
        assert [o.dtype for o in Loaded("m", "1", "0" * 64, "litert", s).inputs] == [
            "int32",
            "int32",
        ]
        rng = np.random.default_rng(2)
        for shape in ((1, 3), (2, 7), (2, 3)):
            a = rng.integers(-(2**30), 2**30, shape).astype(np.int32)
            b = rng.integers(-5, 5, shape).astype(np.int32)
            y = s.infer({"a": a, "b": b})["sum"]
            assert y.dtype == np.int32
            np.testing.assert_array_equal(y, a + b)
