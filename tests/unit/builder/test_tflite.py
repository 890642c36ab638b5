"""export_tflite on the real digits model (litert-torch, ai-edge-quantizer, run by ai-edge-litert),
the search on a LiteRT profile, its ONNX fallback, and the compression report.

Conversions are cached for the session: one Builder (and its pipeline cache) serves every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "litert_torch", reason="litert-torch (pip install 'edgefleet[builder]') is not installed"
)

from agent.errors import BudgetError, ModelError, ParityError
from agent.protocol.profile import DeviceProfile, load_profile
from agent.protocol.signing import load_private_key
from agent.runtime import load_session
from builder.cli import main
from builder.config import load_build_config
from builder.data import DataBundle, Split
from builder.evaluate.accuracy import run_batched
from builder.passes import ModelHandle, ModelKind, PassContext, get_pass
from builder.profile_result import ProfileResult, no_fit_error
from builder.search import Builder
from tests.conftest import ROOT, DigitsProject

pytestmark = pytest.mark.slow

UNCONVERTIBLE = '''
import torch
from torch import nn


class DetNet(nn.Module):
    """A determinant: ONNX has Det, litert-torch has no lowering for aten._linalg_det."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.out = nn.Linear(1, 3)

    def forward(self, x):
        m = self.fc(x.reshape(x.shape[0], 16)).reshape(-1, 2, 2)
        return self.out(torch.linalg.det(m).unsqueeze(1))


def build():
    torch.manual_seed(0)
    return DetNet()
'''


def litert_profile(tmp: Path, name: str, candidates: list[str], **budgets: float) -> DeviceProfile:
    src = (
        (ROOT / "device_profiles" / "rpi4.toml")
        .read_text()
        .replace('name = "rpi4"', f'name = "{name}"')
    )
    lines = [ln for ln in src.splitlines() if not ln.startswith("candidates")]
    i = lines.index("[build]")
    lines.insert(i + 1, "candidates = [" + ", ".join(f'"{c}"' for c in candidates) + "]")
    text = "\n".join(lines) + "\n"
    for k, v in budgets.items():
        text = (
            "\n".join(f"{k} = {v}" if ln.startswith(k) else ln for ln in text.splitlines()) + "\n"
        )
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return load_profile(path)


@pytest.fixture(scope="session")
def builder(digits: DigitsProject, tmp_path_factory: pytest.TempPathFactory) -> Builder:
    cfg = load_build_config(digits.config)
    return Builder(cfg, load_private_key(digits.private_key), tmp_path_factory.mktemp("tfl-cache"))


@pytest.fixture(scope="session")
def tflite_models(
    builder: Builder, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ModelHandle]:
    """The digits model converted once per session: fp32, dynamic-range int8, full int8."""
    src = builder.source()
    out = {}
    for q in ("none", "dynamic", "int8"):
        p = get_pass("export_tflite")
        ctx = PassContext(workdir=tmp_path_factory.mktemp(f"tfl-{q}"), data=builder.data)
        out[q] = p.run(src, p.config_class.model_validate({"quantization": q}), ctx)
    return out


@pytest.fixture(scope="session")
def rpi_like(builder: Builder, tmp_path_factory: pytest.TempPathFactory) -> ProfileResult:
    tmp = tmp_path_factory.mktemp("rpi-like")
    prof = litert_profile(tmp, "pi-test", ["tflite_int8", "tflite_fp32", "int8_static"])
    return builder.build_profile(prof, tmp / "out")


def top1(m: ModelHandle, builder: Builder) -> float:
    assert m.path is not None
    with load_session("litert", m.path) as s:
        out = run_batched(s, builder.data.eval, m.batch_axes)
    return float(np.mean(out["logits"].argmax(1) == builder.data.eval.y))


def test_fp32_matches_torch_at_any_batch(
    tflite_models: dict[str, ModelHandle], builder: Builder
) -> None:
    m = tflite_models["none"]
    assert m.kind == ModelKind.TFLITE and m.precision == "fp32" and m.path is not None
    assert (
        m.notes["tflite"]["reshapes_freed"] >= 1
        and m.notes["tflite"]["parity_max_abs_diff"]["logits"] < 1e-4
    )
    ref = builder._reference
    assert ref is not None
    with load_session("litert", m.path) as s:
        assert s.inputs[0].dtype == "float32" and s.inputs[0].shape[0] == "batch"
        for n in (1, 5, 200):
            got = np.asarray(
                s.infer({"input": builder.data.eval.inputs["input"][:n]})["logits"], np.float32
            )
            np.testing.assert_allclose(got, ref.outputs["logits"][:n], atol=1e-4, rtol=1e-3)


def test_full_int8_has_int8_io_and_is_a_third_of_fp32(
    tflite_models: dict[str, ModelHandle], builder: Builder
) -> None:
    f, q = tflite_models["none"], tflite_models["int8"]
    assert q.precision == "int8_static" and q.path is not None and f.path is not None
    with load_session("litert", q.path) as s:
        assert s.inputs[0].dtype == "int8" and s.outputs[0].dtype == "int8"
    from builder.candidate import _tflite_io_quantization

    io = _tflite_io_quantization(q.path)
    assert set(io) == {"input", "logits"} and all(scale > 0 for scale, _ in io.values())
    assert q.path.stat().st_size <= 0.35 * f.path.stat().st_size
    assert top1(q, builder) >= top1(f, builder) - 0.01


def test_dynamic_range_keeps_float_io(
    tflite_models: dict[str, ModelHandle], builder: Builder
) -> None:
    d, f = tflite_models["dynamic"], tflite_models["none"]
    assert d.precision == "int8_dynamic" and d.path is not None and f.path is not None
    with load_session("litert", d.path) as s:
        assert s.inputs[0].dtype == "float32"
    assert d.path.stat().st_size <= 0.35 * f.path.stat().st_size
    assert top1(d, builder) >= top1(f, builder) - 0.01


def test_report_layers_attribute_int8_weights(tflite_models: dict[str, ModelHandle]) -> None:
    from builder.compression_report import tflite_layers

    assert tflite_models["none"].path is not None and tflite_models["int8"].path is not None
    f, q = tflite_layers(tflite_models["none"].path), tflite_layers(tflite_models["int8"].path)
    for op in ("CONV_2D", "FULLY_CONNECTED"):
        assert f[op]["params"] == q[op]["params"] > 0
        assert q[op]["bytes"] < 0.3 * f[op]["bytes"]  # int8 weights (+ int32 bias) vs float32
    assert f["RESHAPE"]["params"] == 0 and f["FULLY_CONNECTED"]["count"] == 2


def test_prefix_models_cut_after_each_operator(
    tflite_models: dict[str, ModelHandle], builder: Builder, tmp_path: Path
) -> None:
    from builder.tflite_edit import op_counts, prefix_models

    m = tflite_models["none"]
    assert m.path is not None
    buf = m.path.read_bytes()
    prefixes = prefix_models(buf)
    assert len(prefixes) == sum(op_counts(buf).values()) + 1 and prefixes[0][0] == ""
    x = builder.data.eval.inputs["input"][:2]
    (tmp_path / "first.tflite").write_bytes(prefixes[0][1])
    (tmp_path / "last.tflite").write_bytes(prefixes[-1][1])
    with (
        load_session("litert", tmp_path / "first.tflite") as s0,
        load_session("litert", tmp_path / "last.tflite") as s1,
        load_session("litert", m.path) as full,
    ):
        np.testing.assert_array_equal(
            np.asarray(next(iter(s0.infer({"input": x}).values())), np.float32), x
        )
        np.testing.assert_allclose(
            np.asarray(next(iter(s1.infer({"input": x}).values())), np.float32),
            np.asarray(full.infer({"input": x})["logits"], np.float32),
            rtol=1e-6,
            atol=1e-6,
        )


def test_parity_failure_is_named(builder: Builder, tmp_path: Path) -> None:
    p = get_pass("export_tflite")
    cfg = p.config_class.model_validate({"quantization": "int8", "quant_atol_frac": 1e-6})
    with pytest.raises(
        ParityError,
        match=r"export_tflite parity \(torch vs LiteRT, int8, batch 1\).*logits: max \|diff\|",
    ):
        p.run(builder.source(), cfg, PassContext(workdir=tmp_path, data=builder.data))


def test_unconvertible_operator_names_operator_and_pass(builder: Builder, tmp_path: Path) -> None:
    (tmp_path / "det.py").write_text(UNCONVERTIBLE)
    load = get_pass("load")
    x = np.random.default_rng(0).uniform(-1, 1, (16, 1, 4, 4)).astype(np.float32)
    split = Split({"input": x}, None, "mem")
    ctx = PassContext(
        workdir=tmp_path, data=DataBundle(eval=split, calibration=split), task="regression"
    )
    inputs = [{"name": "input", "shape": ["batch", 1, 4, 4]}]
    m = load.run(
        None,
        load.config_class.model_validate(
            {"factory": "det.py:build", "inputs": inputs, "base_dir": str(tmp_path)}
        ),
        ctx,
    )
    p = get_pass("export_tflite")
    with pytest.raises(
        ModelError,
        match=r"^export_tflite: litert-torch cannot convert the model: operator aten\._linalg_det\S* has no LiteRT lowering",
    ):
        p.run(m, p.config_class.model_validate({}), ctx)


def test_search_chooses_smallest_tflite_and_skips_the_onnx_fallback(
    rpi_like: ProfileResult, digits: DigitsProject, capsys: pytest.CaptureFixture[str]
) -> None:
    by = {c.recipe: c for c in rpi_like.candidates}
    assert rpi_like.chosen is by["tflite_int8"] and by["tflite_int8"].runtime == "litert"
    assert by["tflite_fp32"].violations == [
        f"model size {by['tflite_fp32'].metrics['model_bytes'] / 1024:.1f} KB > 512 KB"
    ]
    assert by["tflite_fp32"].artifact is None  # nothing over a budget is packed
    assert by["int8_static"].skipped and "not built: a litert candidate fits" in (
        by["int8_static"].error or ""
    )
    assert rpi_like.artifact is not None and rpi_like.report is not None
    code = main(["inspect", str(rpi_like.artifact), "--key", str(digits.public_key), "--json"])
    doc = json.loads(capsys.readouterr().out)
    m = doc["manifest"]
    assert code == 0 and m["runtime"] == "litert" and m["model"]["file"] == "model.tflite"
    assert (
        m["model"]["inputs"][0]["dtype"] == "int8"
        and m["model"]["inputs"][0]["quantization"]["scale"] > 0
    )
    assert m["model"]["outputs"][0]["quantization"]["scale"] > 0
    assert doc["report"]["recipe"] == "tflite_int8" and {
        r["op"] for r in doc["report"]["layers"]
    } >= {"CONV_2D", "FULLY_CONNECTED"}
    lat = {e["op"]: e["ms"] for e in doc["report"]["latency_by_op"]}
    assert (
        set(lat) >= {"(per-call overhead)", "CONV_2D", "FULLY_CONNECTED"} and sum(lat.values()) > 0
    )
    assert "cut after each operator" in doc["report"]["latency_source"]


def test_tflite_golden_vectors_pass_the_agent_self_test(
    rpi_like: ProfileResult, digits: DigitsProject, tmp_path: Path
) -> None:
    from agent.protocol.artifact import extract_verified, verify_artifact
    from agent.protocol.golden import GoldenSet, self_test
    from agent.protocol.signing import load_public_key

    assert rpi_like.artifact is not None
    va = verify_artifact(rpi_like.artifact, [load_public_key(digits.public_key)])
    extract_verified(va, tmp_path)
    with load_session("litert", tmp_path / "model.tflite") as s:
        res = self_test(
            s, GoldenSet.load(tmp_path / "golden.npz"), va.manifest.golden, classification=True
        )
    assert res.ok, res.reason


def test_html_report_is_self_contained(rpi_like: ProfileResult) -> None:
    assert rpi_like.report is not None
    page = rpi_like.report.read_text()
    assert rpi_like.report.name == "digits-1.0.0-pi-test.report.html"
    assert (
        page.count("<svg") >= 3
        and "CHOSEN" in page
        and "not built: a litert candidate fits" in page
    )
    assert (
        "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
        and "https://" not in page
    )
    assert "<script" not in page and "FULLY_CONNECTED" in page


def test_unconvertible_model_falls_back_to_onnx(digits: DigitsProject, tmp_path: Path) -> None:
    (tmp_path / "det.py").write_text(UNCONVERTIBLE)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.uniform(-1, 1, (64, 1, 4, 4)).astype(np.float32))
    (tmp_path / "b.toml").write_text(
        'name = "det"\nversion = "1.0.0"\ntask = "regression"\n'
        '[model]\nfactory = "det.py:build"\ninput_shape = [1, 4, 4]\n[data]\neval = "eval.npz"\n'
    )
    b = Builder(
        load_build_config(tmp_path / "b.toml"),
        load_private_key(digits.private_key),
        tmp_path / "cache",
    )
    res = b.build_profile(
        litert_profile(tmp_path, "pi-det", ["tflite_fp32", "fp32"]), tmp_path / "out"
    )
    by = {c.recipe: c for c in res.candidates}
    assert "export_tflite" in (by["tflite_fp32"].error or "") and "aten._linalg_det" in (
        by["tflite_fp32"].error or ""
    )
    assert res.chosen is by["fp32"] and by["fp32"].runtime == "onnxruntime"
    assert res.artifact is not None and res.artifact.exists()


def test_nothing_fits_says_how_far_each_candidate_was(builder: Builder, tmp_path: Path) -> None:
    prof = litert_profile(tmp_path, "pi-tight", ["tflite_int8", "tflite_fp32"], max_artifact_kb=50)
    res = builder.build_profile(prof, tmp_path / "out")
    assert res.chosen is None and list((tmp_path / "out").iterdir()) == []
    err = no_fit_error(res)
    assert isinstance(err, BudgetError) and err.exit_code == 5
    msg = str(err)
    assert "profile 'pi-tight': no candidate meets the budgets" in msg
    for c in res.candidates:
        size = c.metrics["model_bytes"] / 1024
        assert f"{c.recipe}: model size {size:.1f} KB > 50 KB" in msg
