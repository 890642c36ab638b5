"""Each pass on the real (trained) digits model, through the real exporters and quantizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.errors import ConfigError, ModelError, ParityError
from agent.runtime import load_session
from builder.config import load_build_config
from builder.data import DataBundle, load_split, single_input
from builder.evaluate.accuracy import run_batched
from builder.parity import check_parity
from builder.passes import ModelHandle, ModelKind, PassContext, get_pass
from builder.pipeline import Pipeline, plan
from tests.conftest import DigitsProject

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(digits: DigitsProject) -> DataBundle:
    s = single_input((1, 8, 8))
    return DataBundle(
        eval=load_split(digits.work / "eval.npz", "eval", s, need_labels=True),
        calibration=load_split(digits.work / "calib.npz", "calibration", s),
        train=load_split(digits.work / "train.npz", "train", s, need_labels=True),
    )


# The digits CNN's one input, as the build config's input_shape = [1, 8, 8] gives it to load.
INPUTS = [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]


def x(data: DataBundle, count: int) -> np.ndarray:
    return data.eval.inputs["input"][:count]


def ctx(tmp: Path, data: DataBundle) -> PassContext:
    tmp.mkdir(parents=True, exist_ok=True)
    return PassContext(workdir=tmp, data=data)


def run(name: str, model: ModelHandle | None, cfg: dict[str, Any], c: PassContext) -> ModelHandle:
    p = get_pass(name)
    return p.run(model, p.config_class.model_validate(cfg), c)


@pytest.fixture(scope="module")
def loaded(
    digits: DigitsProject, data: DataBundle, tmp_path_factory: pytest.TempPathFactory
) -> ModelHandle:
    cfg = load_build_config(digits.config)
    return run(
        "load",
        None,
        {
            "factory": "model.py:build_cnn",
            "weights": str(cfg.resolve("work/digits_cnn.pt")),
            "inputs": INPUTS,
            "output_names": ["logits"],
            "base_dir": str(digits.dir),
        },
        ctx(tmp_path_factory.mktemp("load"), data),
    )


@pytest.fixture(scope="module")
def exported(
    loaded: ModelHandle, data: DataBundle, tmp_path_factory: pytest.TempPathFactory
) -> ModelHandle:
    return run("export_onnx", loaded, {}, ctx(tmp_path_factory.mktemp("export"), data))


def accuracy(m: ModelHandle, data: DataBundle) -> float:
    assert m.path is not None
    with load_session("onnxruntime", m.path) as s:
        out = run_batched(s, data.eval, m.batch_axes)
    return float(np.mean(out["logits"].argmax(1) == data.eval.y))


def test_load_factory_with_weights(loaded: ModelHandle) -> None:
    assert loaded.kind == ModelKind.TORCH and loaded.notes["params"] > 100_000


def test_load_rejects_weights_that_do_not_fit(
    digits: DigitsProject, data: DataBundle, tmp_path: Path
) -> None:
    import torch

    torch.save({"nope": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ModelError, match="do not fit the model"):
        run(
            "load",
            None,
            {
                "factory": "model.py:build_cnn",
                "weights": str(tmp_path / "w.pt"),
                "inputs": INPUTS,
                "base_dir": str(digits.dir),
            },
            ctx(tmp_path, data),
        )


def test_load_pt2_and_onnx(
    loaded: ModelHandle, exported: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(
        loaded.module, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(prog, str(tmp_path / "m.pt2"))
    pt2 = run(
        "load",
        None,
        {"pt2": str(tmp_path / "m.pt2"), "inputs": INPUTS, "output_names": ["logits"]},
        ctx(tmp_path, data),
    )
    assert pt2.kind == ModelKind.TORCH
    assert accuracy(run("export_onnx", pt2, {}, ctx(tmp_path / "e", data)), data) > 0.97
    from_onnx = run("load", None, {"onnx": str(exported.path)}, ctx(tmp_path, data))
    assert from_onnx.kind == ModelKind.ONNX and from_onnx.output_names == ("logits",)
    assert from_onnx.input_names == ("input",) and from_onnx.inputs[0].dtype == "float32"


def test_export_is_single_file_dynamic_batch_and_faithful(
    exported: ModelHandle, loaded: ModelHandle, data: DataBundle
) -> None:
    assert exported.path is not None
    assert [p.name for p in exported.path.parent.iterdir()] == ["model.onnx"]  # no external data
    with load_session("onnxruntime", exported.path) as s:
        assert s.inputs[0].shape[0] == "batch"
        for b in (1, 7):
            assert s.infer({"input": x(data, b)})["logits"].shape == (b, 10)
    assert exported.notes["export_max_abs_diff"] < 1e-4
    assert accuracy(exported, data) > 0.97


def test_parity_failure_lists_every_output() -> None:
    a = {"logits": np.zeros((2, 3), np.float32), "aux": np.ones(2, np.float32)}
    b = {"logits": np.full((2, 3), 0.5, np.float32), "aux": np.ones(2, np.float32)}
    with pytest.raises(ParityError) as e:
        check_parity("test", a, b, atol=1e-3, rtol=0)
    assert "logits: max |diff| 0.5" in str(e.value) and "aux: max |diff| 0" in str(e.value)
    assert e.value.diffs == {"logits": 0.5, "aux": 0.0}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_quantize_static(
    exported: ModelHandle, data: DataBundle, tmp_path: Path, method: str
) -> None:
    q = run("quantize", exported, {"mode": "static", "method": method}, ctx(tmp_path, data))
    assert q.precision == "int8_static" and q.path is not None and exported.path is not None
    assert q.path.stat().st_size < 0.4 * exported.path.stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(q.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert accuracy(q, data) > accuracy(exported, data) - 0.02


def test_quantize_dynamic_and_fp16(exported: ModelHandle, data: DataBundle, tmp_path: Path) -> None:
    assert exported.path is not None
    d = run("quantize", exported, {"mode": "dynamic"}, ctx(tmp_path / "d", data))
    h = run("quantize", exported, {"mode": "fp16"}, ctx(tmp_path / "h", data))
    assert d.precision == "int8_dynamic" and h.precision == "fp16"
    assert h.path is not None and 0.4 < h.path.stat().st_size / exported.path.stat().st_size < 0.6
    assert accuracy(h, data) > accuracy(exported, data) - 0.005
    assert accuracy(d, data) > 0.9


def test_structured_prune_removes_channels_and_recovers(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    p = run("prune", loaded, {"method": "structured", "ratio": 0.5}, ctx(tmp_path, data))
    assert p.notes["params_after"] / p.notes["params_before"] <= 0.5
    assert p.notes["finetune"]["val_top1"] > 0.95
    assert loaded.module is not p.module  # the input model is untouched
    ex = run("export_onnx", p, {}, ctx(tmp_path / "e", data))
    assert accuracy(ex, data) > 0.96


def test_unstructured_prune_reports_sparsity(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    p = run(
        "prune",
        loaded,
        {"method": "unstructured", "ratio": 0.6, "finetune_epochs": 2},
        ctx(tmp_path, data),
    )
    assert 0.55 < p.notes["sparsity"] < 0.65
    assert p.notes["params_after"] == p.notes["params_before"]  # nothing removed, only zeroed


def test_simplify_keeps_outputs(exported: ModelHandle, data: DataBundle, tmp_path: Path) -> None:
    s = run("simplify", exported, {}, ctx(tmp_path, data))
    assert s.notes["simplify_nodes_after"] <= s.notes["simplify_nodes_before"]
    assert s.path is not None and exported.path is not None
    with load_session("onnxruntime", s.path) as a, load_session("onnxruntime", exported.path) as b:
        feeds = {"input": x(data, 16)}
        np.testing.assert_allclose(a.infer(feeds)["logits"], b.infer(feeds)["logits"], atol=1e-5)


def test_chain_is_checked_before_running() -> None:
    with pytest.raises(
        ConfigError, match=r"step 1 \(quantize\) accepts onnx models but gets torch"
    ):
        plan([("quantize", {})], ModelKind.TORCH, "recipe x")
    with pytest.raises(ConfigError, match="unknown pass 'sparkle'"):
        plan([("export_onnx", {}), ("sparkle", {})], ModelKind.TORCH, "recipe x")
    with pytest.raises(ConfigError, match=r"step 1 \(quantize\).*mode"):
        plan([("quantize", {"mode": "int3"})], ModelKind.ONNX, "recipe x")


def test_pipeline_caches_by_input_and_config(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    pipe = Pipeline(tmp_path / "cache", lambda w: ctx(w, data))
    steps = plan([("export_onnx", {}), ("simplify", {})], ModelKind.TORCH, "t")
    first = pipe.run(loaded, steps)
    assert [s.cached for s in first.steps] == [False, False]
    # A new pipeline over the same cache dir reuses the files on disk.
    second = Pipeline(tmp_path / "cache", lambda w: ctx(w, data)).run(loaded, steps)
    assert [s.cached for s in second.steps] == [True, True]
    assert second.model.digest == first.model.digest
    other = pipe.run(loaded, plan([("export_onnx", {"opset": 17})], ModelKind.TORCH, "t"))
    assert other.steps[0].cached is False


def test_lowrank_factors_linear_layers_and_recovers(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    p = run("lowrank", loaded, {"method": "energy", "energy": 0.8}, ctx(tmp_path, data))
    layers = {e["layer"]: e for e in p.notes["lowrank_layers"]}
    fc = layers["head.1"]  # Linear(512, 128)
    assert fc["replaced"] and fc["rank"] < fc["full_rank"] == 128
    assert fc["params_after"] == fc["rank"] * (512 + 128)
    assert p.notes["params_after"] < p.notes["params_before"]
    assert loaded.module is not p.module
    ex = run("export_onnx", p, {}, ctx(tmp_path / "e", data))
    assert accuracy(ex, data) > 0.96


def test_lowrank_without_finetune_is_the_svd_truncation(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    p = run(
        "lowrank",
        loaded,
        {"method": "ratio", "ratio": 0.5, "finetune_epochs": 0},
        ctx_no_train(tmp_path, data),
    )
    first, second = p.module.get_submodule("head.1")  # Linear(512, 64) then Linear(64, 128)
    assert (first.out_features, second.in_features) == (64, 64)
    w = loaded.module.get_submodule("head.1").weight.detach().numpy().astype(np.float64)
    u, sv, vh = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :64] * sv[:64]) @ vh[:64]  # Eckart-Young: the best rank-64 approximation
    composed = second.weight.detach().numpy() @ first.weight.detach().numpy()
    np.testing.assert_allclose(composed, best, atol=1e-5)
    assert p.notes.get("finetune") is None


def ctx_no_train(tmp: Path, data: DataBundle) -> PassContext:
    return ctx(tmp, DataBundle(eval=data.eval, calibration=data.calibration, train=None))


def test_lowrank_rank_larger_than_layer_is_a_clear_error(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    with pytest.raises(
        ModelError, match=r"rank 200 is larger than layer 'head.1' allows \(at most 128\)"
    ):
        run("lowrank", loaded, {"method": "rank", "rank": 200}, ctx(tmp_path, data))


def test_distill_trains_a_smaller_student(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    p = run("distill", loaded, {"student_kwargs": {"width": 12}, "epochs": 25}, ctx(tmp_path, data))
    r = p.notes["distill"]
    assert r["param_ratio"] <= 0.5 and r["student_params"] == p.notes["params"]
    assert r["teacher_top1"] - r["student_top1"] <= 0.03
    assert type(p.module) is type(loaded.module) and p.module is not loaded.module
    ex = run("export_onnx", p, {}, ctx(tmp_path / "e", data))
    assert accuracy(ex, data) == pytest.approx(r["student_top1"], abs=0.005)


def test_distill_bad_inputs_are_clear(
    loaded: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="distill needs training data"):
        run("distill", loaded, {"student_kwargs": {"width": 8}}, ctx_no_train(tmp_path, data))
    with pytest.raises(ModelError, match="name a student_factory"):
        run("distill", loaded, {}, ctx(tmp_path, data))
    with pytest.raises(ModelError, match=r"DigitsCNN\(\*\*\{'depth': 3\}\) failed: TypeError"):
        run("distill", loaded, {"student_kwargs": {"depth": 3}}, ctx(tmp_path, data))


def test_sensitivity_keeps_sensitive_layers_in_float(
    exported: ModelHandle, data: DataBundle, tmp_path: Path
) -> None:
    import onnx

    plain = run("quantize", exported, {"mode": "static"}, ctx(tmp_path / "p", data))
    q = run(
        "quantize",
        exported,
        {"mode": "static", "auto_float_below_sqnr_db": 45.0},
        ctx(tmp_path / "q", data),
    )
    sens = q.notes["sensitivity"]
    assert [e["sqnr_db"] for e in sens] == sorted(
        e["sqnr_db"] for e in sens
    )  # most sensitive first
    assert {e["op"] for e in sens} >= {"Conv", "Gemm"} and len(sens) == 5
    kept = q.notes["kept_float"]
    assert (
        kept == [e["node"] for e in sens if e["sqnr_db"] < 45.0] and kept
    )  # the digits head is below 45 dB
    assert q.path is not None and plain.path is not None

    def float_gemms(path: Path) -> int:
        """Conv/Gemm nodes whose weights are plain float initializers, not dequantized int8."""
        g = onnx.load(str(path)).graph
        deq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
        return sum(1 for n in g.node if n.op_type in ("Gemm", "Conv") and n.input[1] not in deq)

    assert float_gemms(q.path) == len(kept) and float_gemms(plain.path) == 0
    assert accuracy(q, data) >= accuracy(plain, data) - 0.005
