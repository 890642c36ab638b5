"""`edgefleet build` on bad inputs: each is one line on stderr with its exit code, never a traceback.

Exit codes: 2 config/usage, 3 data, 4 model, 5 budget. Every project is a tiny model written
to tmp_path (a factory .py file, or an ONNX graph made with onnx.helper).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.unit.builder.tiny import (
    MLP,
    assert_one_line_error,
    float_onnx,
    mlp_data,
    project,
    token_data,
    two_input_onnx,
    write_profile,
)

ONNX_CFG = '[model]\nonnx = "m.onnx"\n[data]\neval = "eval.npz"\n'
FACTORY_CFG = '[model]\nfactory = "model.py:build"\n{model}\n[data]\neval = "eval.npz"\n{data}'


def onnx_project(
    tmp_path: Path,
    eval_arrays: dict[str, np.ndarray],
    two_inputs: bool = False,
    config: str = ONNX_CFG,
    task: str = "classification",
):  # type: ignore[no-untyped-def]
    p = project(tmp_path / "p", config, data={"eval.npz": eval_arrays}, task=task)
    (two_input_onnx if two_inputs else float_onnx)(p.dir / "m.onnx")
    return p


def factory_project(
    tmp_path: Path,
    data: dict[str, dict[str, np.ndarray]],
    model: str = "input_shape = [4]",
    extra_data: str = "",
    source: str = MLP,
    task: str = "classification",
):  # type: ignore[no-untyped-def]
    return project(
        tmp_path / "p",
        FACTORY_CFG.format(model=model, data=extra_data),
        files={"model.py": source},
        data=data,
        task=task,
    )


@pytest.fixture
def prof(tmp_path: Path) -> Path:
    return write_profile(tmp_path, "tiny-cpu", ["fp32"])


# ---------------------------------------------------------------- data (exit 3)


def test_int64_data_for_a_float_model(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = onnx_project(tmp_path, {"x": np.ones((8, 4), np.int64), "y": np.zeros(8, np.int64)})
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 3, "eval data", "x has dtype int64, the model takes float32")


def test_int64_data_for_a_float_factory_model(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = mlp_data()
    p = factory_project(tmp_path, {"eval.npz": {"x": data["x"].astype(np.int64), "y": data["y"]}})
    code, _, err = p.build(capsys, "-p", str(prof), "--check")
    assert_one_line_error(code, err, 3, "input has dtype int64, the model takes float32")


def test_float_data_for_an_int64_model(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = token_data()
    p = onnx_project(
        tmp_path,
        {
            "input_ids": t["input_ids"].astype(np.float32),
            "attention_mask": t["attention_mask"],
            "y": np.zeros(48, np.int64),
        },
        two_inputs=True,
    )
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 3, "input_ids has dtype float32, the model takes int64")


def test_missing_input_array_is_named(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = token_data()
    p = onnx_project(
        tmp_path, {"input_ids": t["input_ids"], "y": np.zeros(48, np.int64)}, two_inputs=True
    )
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(
        code, err, 3, "no array for model input(s) attention_mask", "found: input_ids"
    )


def test_wrong_sample_shape(tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = onnx_project(tmp_path, {"x": np.ones((8, 5), np.float32), "y": np.zeros(8, np.int64)})
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 3, "x has shape (8, 5), expected (N, 4)")


def test_nan_in_a_float_input(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.ones((8, 4), np.float32)
    x[3, 2] = np.nan
    p = onnx_project(tmp_path, {"x": x, "y": np.zeros(8, np.int64)})
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 3, "x contains NaN or infinite values")


def test_float_labels_for_a_classifier(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = onnx_project(tmp_path, {"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.float32)})
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 3, "y has dtype float32, expected integer class labels")


@pytest.mark.parametrize("task", ["regression", "embedding"])
def test_float_targets_and_unlabelled_training_data_are_accepted(
    task: str, tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression/embedding: float y in the eval data is fine, and train data may have no y at all."""
    data = {"eval.npz": mlp_data(y="float"), "train.npz": mlp_data(seed=1, y="none")}
    p = factory_project(tmp_path, data, extra_data='train = "train.npz"', task=task)
    code, out, err = p.build(capsys, "-p", str(prof), "--check", "--json")
    assert code == 0, err
    assert json.loads(out) == {"ok": True, "checked": ["tiny-cpu/fp32"]}


# ---------------------------------------------------------------- model (exit 4)


def test_factory_with_a_syntax_error_fails_the_check(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = factory_project(tmp_path, {"eval.npz": mlp_data()}, source="def build(:\n    return None\n")
    code, out, err = p.build(capsys, "-p", str(prof), "--check")
    assert_one_line_error(
        code, err, 4, "factory 'model.py:build': cannot import model.py: SyntaxError"
    )
    assert "OK" not in out


def test_factory_whose_model_does_not_take_the_data(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No input_shape: the input comes from the data (5 features), which the 4-feature MLP cannot take."""
    data = mlp_data()
    p = factory_project(
        tmp_path, {"eval.npz": {"x": np.ones((8, 5), np.float32), "y": data["y"][:8]}}, model=""
    )
    code, out, err = p.build(capsys, "-p", str(prof), "--check")
    assert_one_line_error(
        code, err, 4, "model does not run on the build data (x float32[2, 5]): RuntimeError"
    )
    assert "OK" not in out


# ---------------------------------------------------------------- config (exit 2)


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ("[budgets]\nmax_cosine = 0.5\n", "budgets: unknown budget max_cosine"),
        (
            "[profiles.tiny-cpu]\nbudgets = { max_latency = 3 }\n",
            "profiles.tiny-cpu.budgets: unknown budget max_latency",
        ),
    ],
)
def test_unknown_budget_key(
    table: str, where: str, tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = onnx_project(
        tmp_path,
        {"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)},
        config=table + ONNX_CFG,
    )
    code, _, err = p.build(capsys, "-p", str(prof), "--check")
    line = assert_one_line_error(code, err, 2, where)
    assert "min_cosine" in line  # the known budgets are listed


@pytest.mark.parametrize("key", ["candidates", "add_candidates"])
def test_unknown_override_recipe(
    key: str, tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = onnx_project(
        tmp_path,
        {"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)},
        config=f'[profiles.tiny-cpu]\n{key} = ["int9_magic"]\n' + ONNX_CFG,
    )
    code, _, err = p.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 2, "unknown candidate recipe 'int9_magic'")
    assert not (p.dir / "out").exists()


# ---------------------------------------------------------------- budget (exit 5)


def test_json_document_when_every_candidate_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two profiles where nothing fits: one JSON document on stdout, one error line naming both, exit 5."""
    a = write_profile(tmp_path, "tight-a", ["fp32", "int8_dynamic"], max_artifact_kb=0.01)
    b = write_profile(tmp_path, "tight-b", ["fp32"], max_p95_ms=0.0001)
    x = mlp_data()
    p = onnx_project(tmp_path, {"x": x["x"], "y": x["y"]})
    code, out, err = p.build(capsys, "-p", str(a), "-p", str(b), "--json")
    line = assert_one_line_error(
        code,
        err,
        5,
        "profile 'tight-a': no candidate meets the budgets",
        "profile 'tight-b': no candidate meets the budgets",
    )
    assert "fp32: model size" in line and "> 0.01 KB" in line and "p95 " in line
    doc = json.loads(out)
    assert doc["ok"] is False and [r["profile"] for r in doc["profiles"]] == ["tight-a", "tight-b"]
    for r in doc["profiles"]:
        assert r["chosen"] is None and r["artifact"] is None and r["candidates"]
        assert all(c["violations"] and not c["fits"] for c in r["candidates"])
    assert not list((p.dir / "out").glob("*.efa"))


def test_security_floor_is_signed_into_the_manifest(
    tmp_path: Path, prof: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`security_floor` (anti-rollback, docs/security.md) goes into the signed manifest; one
    above the version is a one-line config error."""
    import json
    import tarfile

    arrays = {"x": np.ones((8, 4), np.float32), "y": np.zeros(8, np.int64)}
    bad = onnx_project(tmp_path / "bad", arrays, config='security_floor = "2.0"\n' + ONNX_CFG)
    code, _, err = bad.build(capsys, "-p", str(prof), "--check")
    assert_one_line_error(code, err, 2, "security_floor 2.0 is above version 1.0.0")
    p = onnx_project(tmp_path / "ok", arrays, config='security_floor = "0.9"\n' + ONNX_CFG)
    code, _, err = p.build(capsys, "-p", str(prof))
    assert code == 0, err
    (art,) = (p.dir / "out").glob("*.efa")
    with tarfile.open(art) as tar:
        f = tar.extractfile("manifest.json")
        assert f is not None
        assert json.load(f)["security_floor"] == "0.9"
