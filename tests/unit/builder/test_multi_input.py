"""Models with several named inputs of any dtype, end to end through `edgefleet build`.

A two-input int64 torch model (input_ids + attention_mask) and an ONNX step model with a
scalar int64 input and a state whose batch axis is 1 each build for a custom profile into a
verified artifact: the manifest lists every input with its dtype, and the golden vectors
pass the agent's self-test in onnxruntime. Budget overrides and selection by model bytes
are checked on a tiny ONNX MLP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.builder.tiny import (
    BAG,
    STEP,
    Project,
    assert_one_line_error,
    float_onnx,
    mlp_data,
    project,
    run_cli,
    state_data,
    stateful_onnx,
    token_data,
    write_profile,
)


def inspect(capsys: pytest.CaptureFixture[str], p: Project, artifact: Path) -> dict[str, Any]:
    code, out, err = run_cli(
        capsys, "inspect", str(artifact), "--key", str(p.key.with_suffix(".pub")), "--json"
    )
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def self_test(p: Project, artifact: Path, tmp: Path, classification: bool = False) -> Any:
    from agent.protocol.artifact import extract_verified, verify_artifact
    from agent.protocol.golden import GoldenSet, self_test
    from agent.protocol.signing import load_public_key
    from agent.runtime import load_session

    va = verify_artifact(artifact, [load_public_key(p.key.with_suffix(".pub"))])
    extract_verified(va, tmp)
    golden = GoldenSet.load(tmp / "golden.npz")
    with load_session("onnxruntime", tmp / "model.onnx") as s:
        return golden, self_test(s, golden, va.manifest.golden, classification=classification)


def build_json(capsys: pytest.CaptureFixture[str], p: Project, *args: str) -> dict[str, Any]:
    code, out, err = p.build(capsys, *args, "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


# ---------------------------------------------------------------- two int64 inputs, torch


def bag(tmp: Path, output: str) -> tuple[Project, Path]:
    cfg = (
        '[model]\nfactory = "model.py:build"\ninputs = ["input_ids", "attention_mask"]\n'
        f'outputs = ["{output}"]\n'
        'dynamic_axes = { input_ids = { 1 = "seq" }, attention_mask = { 1 = "seq" } }\n'
        '[data]\neval = "eval.npz"\ncalibration = "calib.npz"\n'
    )
    p = project(
        tmp / "p",
        cfg,
        files={"model.py": BAG},
        task="embedding",
        data={"eval.npz": token_data(), "calib.npz": token_data(seed=1)},
    )
    return p, write_profile(tmp, "text-cpu", ["fp32", "int8_dynamic"])


@pytest.mark.slow
# "embedding" is also the name torch's dynamo exporter gives the nn.Embedding lookup's value.
@pytest.mark.parametrize("output", ["vector", "embedding"])
def test_two_int64_inputs_build_a_verified_artifact(
    output: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, prof = bag(tmp_path / "bag", output)
    doc = build_json(capsys, p, "-p", str(prof))
    r = doc["profiles"][0]
    cands = {c["recipe"]: c for c in r["candidates"]}
    assert all(c["fits"] for c in cands.values()), cands
    assert r["chosen"] == "int8_dynamic"  # select = smallest
    assert (
        cands["int8_dynamic"]["metrics"]["cosine_min"] >= 0.9
        and "top1" not in cands["int8_dynamic"]["metrics"]
    )
    m = inspect(capsys, p, Path(r["artifact"]))["manifest"]
    assert m["task"] == "embedding" and m["precision"] == "int8_dynamic"
    ins = {s["name"]: s for s in m["model"]["inputs"]}
    assert list(ins) == ["input_ids", "attention_mask"]
    assert all(s["dtype"] == "int64" and s["shape"][0] == "batch" for s in ins.values())
    assert [s["name"] for s in m["model"]["outputs"]] == [output]
    golden, res = self_test(p, Path(r["artifact"]), tmp_path / "x")
    assert res.ok, res.reason
    assert (
        set(golden.inputs) == {"input_ids", "attention_mask"}
        and golden.inputs["input_ids"].dtype == np.int64
    )
    assert m["golden"]["count"] == len(golden.inputs["input_ids"]) == 8


# ---------------------------------------------------------------- scalar input and a batch-axis-1 state, ONNX


@pytest.fixture(scope="module")
def step_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, Path]:
    tmp = tmp_path_factory.mktemp("step")
    cfg = (
        '[model]\nonnx = "vad.onnx"\nbatch_axes = { state = 1, sr = "none", stateN = 1 }\n'
        '[data]\neval = "eval.npz"\n'
    )
    p = project(tmp / "p", cfg, task="regression", data={"eval.npz": state_data()})
    stateful_onnx(p.dir / "vad.onnx")
    return p, write_profile(tmp, "vad-cpu", ["fp32", "int8_dynamic"])


def test_scalar_input_and_state_on_axis_1_build_a_verified_artifact(
    step_model: tuple[Project, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, prof = step_model
    doc = build_json(capsys, p, "-p", str(prof))
    r = doc["profiles"][0]
    assert all(c["fits"] for c in r["candidates"]), r["candidates"]
    assert r["chosen"] == "int8_dynamic"
    m = inspect(capsys, p, Path(r["artifact"]))["manifest"]
    ins = {s["name"]: (s["dtype"], s["shape"]) for s in m["model"]["inputs"]}
    assert ins == {
        "input": ("float32", ["batch", 64]),
        "state": ("float32", [2, "batch", 32]),
        "sr": ("int64", []),
    }
    golden, res = self_test(p, Path(r["artifact"]), tmp_path)
    assert res.ok, res.reason
    # One case a sample, each in the runtime's layout: sr a scalar, the state's batch on axis 1.
    assert not golden.batched and m["golden"]["count"] == len(golden.cases) > 1
    for case in golden.cases:
        assert case.inputs["sr"].shape == () and case.inputs["sr"].dtype == np.int64
        assert case.inputs["state"].shape == (2, 1, 32) and case.expected["stateN"].shape == (
            2,
            1,
            32,
        )


@pytest.mark.slow
def test_torch_model_with_a_scalar_input_and_state_on_axis_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same step model as a torch factory: exported with sr a scalar, fed a scalar everywhere."""
    cfg = (
        '[model]\nfactory = "model.py:build"\ninputs = ["input", "state", "sr"]\noutputs = ["output", "stateN"]\n'
        'batch_axes = { state = 1, sr = "none", stateN = 1 }\n[data]\neval = "eval.npz"\n'
    )
    p = project(
        tmp_path / "p",
        cfg,
        files={"model.py": STEP},
        task="regression",
        data={"eval.npz": state_data()},
    )
    r = build_json(capsys, p, "-p", str(write_profile(tmp_path, "vad-cpu", ["fp32"])))["profiles"][
        0
    ]
    assert r["chosen"] == "fp32", r["candidates"]
    m = inspect(capsys, p, Path(r["artifact"]))["manifest"]
    ins = {s["name"]: (s["dtype"], s["shape"]) for s in m["model"]["inputs"]}
    assert ins["sr"] == ("int64", []) and ins["state"] == ("float32", [2, "batch", 32])
    golden, res = self_test(p, Path(r["artifact"]), tmp_path / "x")
    assert res.ok, res.reason
    assert golden.inputs["sr"].shape == ()


# ---------------------------------------------------------------- budgets and selection (tiny ONNX MLP)


@pytest.fixture
def mlp(tmp_path: Path) -> Project:
    p = project(
        tmp_path / "p",
        '[model]\nonnx = "m.onnx"\n[data]\neval = "eval.npz"\n',
        data={"eval.npz": mlp_data()},
    )
    float_onnx(p.dir / "m.onnx")
    return p


def test_profile_override_changes_the_verdict(
    mlp: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same fp32 candidate breaks the profile's 0.01 KB size budget, and fits once the
    build config raises it for that profile (the per-profile table beats [budgets])."""
    prof = write_profile(tmp_path, "small-cpu", ["fp32"], max_artifact_kb=0.01)
    code, _, err = mlp.build(capsys, "-p", str(prof))
    assert_one_line_error(
        code, err, 5, "profile 'small-cpu': no candidate meets the budgets", "fp32: model size"
    )
    base = mlp.config.read_text()
    mlp.config.write_text(
        base
        + "[budgets]\nmax_artifact_kb = 0.02\n[profiles.small-cpu]\nbudgets = { max_artifact_kb = 1000 }\n"
    )
    doc = build_json(capsys, mlp, "-p", str(prof))
    r = doc["profiles"][0]
    assert r["chosen"] == "fp32" and r["budgets"]["max_artifact_kb"] == 1000
    # The budgets the artifact was gated on travel in its signed manifest.
    assert (
        inspect(capsys, mlp, Path(r["artifact"]))["manifest"]["budgets"]["max_artifact_kb"] == 1000
    )
    mlp.config.write_text(
        base + "[budgets]\nmax_artifact_kb = 0.02\n"
    )  # [budgets] alone still breaks it
    code, _, err = mlp.build(capsys, "-p", str(prof))
    assert_one_line_error(code, err, 5, "model size", "> 0.02 KB")


def test_override_candidates_replace_and_extend_the_profile(
    mlp: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = write_profile(tmp_path, "swap-cpu", ["fp32", "int8_static"])
    base = mlp.config.read_text()
    mlp.config.write_text(
        base + '[profiles.swap-cpu]\ncandidates = ["int8_dynamic"]\nadd_candidates = ["fp32"]\n'
    )
    code, out, err = mlp.build(capsys, "-p", str(prof), "--check", "--json")
    assert code == 0, err
    assert json.loads(out)["checked"] == ["swap-cpu/int8_dynamic", "swap-cpu/fp32"]


def test_smallest_is_decided_by_model_bytes(
    mlp: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fp32 first in the list, int8_dynamic second: the smaller model file wins even where
    the two artifacts (tar padding, golden vectors, report) come out the same size."""
    float_onnx(mlp.dir / "m.onnx", hidden=128)  # fp32 ~3.9 KB, int8 ~2.8 KB: both tars 20 KB
    prof = write_profile(tmp_path, "pick-cpu", ["fp32", "int8_dynamic"], select="smallest")
    r = build_json(capsys, mlp, "-p", str(prof))["profiles"][0]
    cands = {c["recipe"]: c["metrics"] for c in r["candidates"]}
    assert cands["int8_dynamic"]["model_bytes"] < cands["fp32"]["model_bytes"]
    assert (
        cands["int8_dynamic"]["artifact_bytes"] == cands["fp32"]["artifact_bytes"]
    )  # a tie on the tar
    assert r["chosen"] == "int8_dynamic" and r["precision"] == "int8_dynamic"
