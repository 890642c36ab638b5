"""`edgefleet build` / `inspect` end to end: the gate, the JSON summary, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.protocol.profile import load_profile
from builder.candidate import gate
from builder.cli import main
from tests.conftest import ROOT, DigitsProject

pytestmark = pytest.mark.slow


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    # Progress lines may precede it; the error itself is one line, and the last one.
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.fixture(scope="module")
def built(digits: DigitsProject, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    code = main(
        [
            "build",
            str(digits.config),
            "-p",
            "x86-ipc",
            "-p",
            "generic-cpu",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--json",
            "--profiles-dir",
            str(ROOT / "device_profiles"),
        ]
    )
    assert code == 0
    return out, {}


def test_build_writes_one_verified_artifact_per_profile(
    built: tuple[Path, dict],
    digits: DigitsProject,  # type: ignore[type-arg]
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = built
    capsys.readouterr()
    names = sorted(p.name for p in out.glob("*.efa"))
    assert names == ["digits-1.0.0-generic-cpu.efa", "digits-1.0.0-x86-ipc.efa"]
    # The HTML compression report lies beside each artifact.
    assert sorted(p.name for p in out.glob("*.report.html")) == [
        n.replace(".efa", ".report.html") for n in names
    ]
    code, stdout, _ = run_cli(
        capsys, "inspect", str(out / names[1]), "--key", str(digits.public_key), "--json"
    )
    assert code == 0
    doc = json.loads(stdout)
    m = doc["manifest"]
    assert doc["verified"] and m["profile"] == "x86-ipc" and m["runtime"] == "onnxruntime"
    assert m["precision"].startswith("int8")  # x86-ipc: int8 candidates come first and are smallest
    assert m["metrics"]["top1_drop_pt"] <= 1.0 and m["metrics"]["latency_b1"]["p95_ms"] > 0
    assert m["golden"]["count"] == 8 and set(m["files"]) == {
        "model.onnx",
        "golden.npz",
        "report.json",
        "reference.json",
    }
    assert m["monitor"] == {"file": "reference.json"}
    code, text, _ = run_cli(capsys, "inspect", str(out / names[1]), "--key", str(digits.public_key))
    assert code == 0 and "verified   signature by key" in text and "accuracy   top-1" in text
    assert "layers     Conv " in text and "time       " in text  # the report's summary
    assert (
        set(doc["report"]["summary"]) >= {"model_bytes", "top1", "p95_ms"}
        and doc["report"]["recipe"] == m["recipe"]["name"]
    )
    lat = doc["report"]["latency_by_op"]
    assert (
        lat
        and all(e["ms"] > 0 for e in lat)
        and sum(e["share"] for e in lat) == pytest.approx(1.0, abs=0.01)
    )


def test_golden_vectors_pass_the_self_test(
    built: tuple[Path, dict], digits: DigitsProject, tmp_path: Path
) -> None:  # type: ignore[type-arg]
    from agent.protocol.artifact import extract_verified, verify_artifact
    from agent.protocol.golden import GoldenSet, self_test
    from agent.protocol.signing import load_public_key
    from agent.runtime import load_session

    va = verify_artifact(
        built[0] / "digits-1.0.0-x86-ipc.efa", [load_public_key(digits.public_key)]
    )
    extract_verified(va, tmp_path)
    with load_session("onnxruntime", tmp_path / "model.onnx") as s:
        res = self_test(
            s, GoldenSet.load(tmp_path / "golden.npz"), va.manifest.golden, classification=True
        )
    assert res.ok, res.reason
    assert res.top1_agreement is not None and res.top1_agreement >= 0.875


def test_json_summary(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "build",
        str(digits.config),
        "-p",
        "generic-cpu",
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
    )
    assert code == 0
    doc = json.loads(out)
    prof = doc["profiles"][0]
    from agent.protocol.profile import get_profile

    listed = list(get_profile("generic-cpu", ROOT / "device_profiles").build.candidates)
    assert (
        doc["ok"]
        and prof["profile"] == "generic-cpu"
        and [c["recipe"] for c in prof["candidates"]] == listed
    )
    assert all(c["metrics"]["model_bytes"] > 0 for c in prof["candidates"])
    chosen = next(c for c in prof["candidates"] if c["recipe"] == prof["chosen"])
    assert chosen["metrics"]["artifact_bytes"] > chosen["metrics"]["model_bytes"]


def test_gate_refuses_over_budget_and_nothing_is_written(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = (ROOT / "device_profiles" / "generic-cpu.toml").read_text()
    prof = tmp_path / "tight.toml"
    prof.write_text(
        src.replace('name = "generic-cpu"', 'name = "tight"').replace(
            "max_artifact_kb = 2048", "max_artifact_kb = 20"
        )
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "build",
        str(digits.config),
        "-p",
        str(prof),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert code == 5
    assert (
        "no candidate meets the budgets" in err
        and "fp32: model size " in err
        and "KB > 20 KB" in err
    )
    assert "int8_static: model size" in err and "> 20 KB" in err
    assert list(out.iterdir()) == []  # no artifact, no .part file


def test_gate_function_names_every_broken_budget(profiles_dir: Path) -> None:
    p = load_profile(profiles_dir / "rpi4.toml")
    metrics = {
        "model_bytes": 600 * 1024,
        "top1_drop_pt": 2.5,
        "latency_b1": {"p95_ms": 9.0},
        "peak_rss_mb": 300.0,
    }
    v = gate(metrics, p, "classification")
    assert v == [
        "model size 600.0 KB > 512 KB",
        "accuracy drop 2.50 pt > 1 pt",
        "p95 9.000 ms > 5 ms",
        "peak RSS 300.0 MB > 256 MB",
    ]
    ok = {
        "model_bytes": 100 * 1024,
        "top1_drop_pt": 0.0,
        "latency_b1": {"p95_ms": 1.0},
        "peak_rss_mb": 100.0,
    }
    assert gate(ok, p, "classification") == []


def _variant(digits: DigitsProject, tmp_path: Path, **edits: str) -> Path:
    d = tmp_path / "proj"
    shutil.copytree(digits.dir, d, ignore=shutil.ignore_patterns("keys"))
    cfg = (d / "edgefleet.toml").read_text()
    cfg = cfg.replace(
        'signing_key = "work/keys/edgefleet.key"', f'signing_key = "{digits.private_key}"'
    )
    for old, new in edits.items():
        assert old.replace("_", " ") in cfg or old in cfg, old
        cfg = cfg.replace(old, new)
    (d / "edgefleet.toml").write_text(cfg)
    return d / "edgefleet.toml"


BAD_CASES = {
    "unknown profile": ({}, ["-p", "quantum-toaster"], ["unknown profile 'quantum-toaster'"]),
    "factory import fails": (
        {'factory = "model.py:build_cnn"': 'factory = "no_such_module:build"'},
        [],
        ["cannot import no_such_module"],
    ),
    "factory missing function": (
        {'factory = "model.py:build_cnn"': 'factory = "model.py:nope"'},
        [],
        ["has no callable 'nope'"],
    ),
    "factory wrong input": (
        {"input_shape = [1, 8, 8]": "input_shape = [3, 8, 8]"},
        [],
        ["eval data", "expected (N, 3, 8, 8)"],
    ),
    "unknown key in config": (
        {'task = "classification"': 'task = "classification"\nturbo = 1'},
        [],
        ["turbo: unknown key"],
    ),
    "unknown pass": (
        {"[data]": '[recipes]\nfp32 = [{pass = "sparkle"}]\n\n[data]'},
        [],
        ["unknown pass 'sparkle'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_config_is_one_line(
    case: str, digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edits, extra, needles = BAD_CASES[case]
    cfg = _variant(digits, tmp_path, **edits)
    args = extra or ["-p", "generic-cpu"]
    code, _, err = run_cli(
        capsys,
        "build",
        str(cfg),
        *args,
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _data_case(
    digits: DigitsProject, tmp_path: Path, role: str, arrays: dict[str, np.ndarray]
) -> Path:
    cfg = _variant(digits, tmp_path)
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    key = {"eval": 'eval = "work/eval.npz"', "calibration": 'calibration = "work/calib.npz"'}[role]
    cfg.write_text(cfg.read_text().replace(key, key.split("=")[0] + f'= "{tmp_path / "bad.npz"}"'))
    return cfg


@pytest.mark.parametrize(
    ("role", "arrays", "needles"),
    [
        (
            "calibration",
            {"x": np.zeros((4, 1, 9, 9), np.float32)},
            ["calibration data", "shape (4, 1, 9, 9)"],
        ),
        (
            "calibration",
            {"x": np.zeros((4, 1, 8, 8), np.int32)},
            ["calibration data", "dtype int32"],
        ),
        ("eval", {"x": np.zeros((4, 1, 8, 8), np.float32)}, ["classifier needs labels"]),
        (
            "eval",
            {"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.zeros(4, np.float32)},
            ["y has dtype float32"],
        ),
        (
            "eval",
            {"x": np.zeros((4, 1, 8, 8), np.float32), "y": np.full(4, 12)},
            ["label 12 is out of range"],
        ),
        ("eval", {"z": np.zeros(3)}, ["no array for model input(s) input", "found: z"]),
    ],
)
def test_bad_data_is_one_line(
    role: str,
    arrays: dict[str, np.ndarray],
    needles: list[str],
    digits: DigitsProject,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _data_case(digits, tmp_path, role, arrays)
    code, _, err = run_cli(
        capsys,
        "build",
        str(cfg),
        "-p",
        "generic-cpu",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert_one_line_error(code, err, *needles)


def test_invalid_profile_and_unwritable_output(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text(
        (ROOT / "device_profiles" / "generic-cpu.toml")
        .read_text()
        .replace('name = "generic-cpu"', 'name = "broken"')
        .replace("threads = 1", "threads = 0")
    )
    code, _, err = run_cli(
        capsys, "build", str(digits.config), "-p", str(bad), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "broken.toml: runtime.threads")
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    code, _, err = run_cli(
        capsys,
        "build",
        str(digits.config),
        "-p",
        "generic-cpu",
        "--out",
        str(blocker / "sub"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert_one_line_error(code, err, "cannot create output directory")


def test_distilled_recipes_need_a_distill_table(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "nodistill.toml"
    text = digits.config.read_text()
    start = text.index("[distill]")
    cfg.write_text(text[:start] + text[text.index("[data]") :])
    for name in ("model.py",):
        shutil.copy(digits.dir / name, tmp_path / name)
    (tmp_path / "work").symlink_to(digits.work)
    code, out, _ = run_cli(capsys, "build", str(cfg), "-p", "x86-ipc", "--check", "--json")
    assert code == 0
    checked = json.loads(out)["checked"]
    assert "x86-ipc/int8_static" in checked and "x86-ipc/distilled_int8_static" not in checked
    assert (
        "x86-ipc/distilled_int8_static"
        in json.loads(
            run_cli(capsys, "build", str(digits.config), "-p", "x86-ipc", "--check", "--json")[1]
        )["checked"]
    )


def test_check_validates_without_building(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "build",
        str(digits.config),
        "--all-profiles",
        "--check",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0 and "recipe chains checked" in out and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "wrong key", "missing"])
def test_inspect_rejects_damaged_artifacts(
    damage: str,
    built: tuple[Path, dict],
    digits: DigitsProject,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = built[0] / "digits-1.0.0-generic-cpu.efa"
    art = tmp_path / "a.efa"
    data = bytearray(src.read_bytes())
    key = digits.public_key
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "garbage":
        data = bytearray(b"this is not a tar file" * 50)
    elif damage == "wrong key":
        from agent.protocol.signing import generate_keypair

        key = generate_keypair(tmp_path / "k")[1]
    if damage != "missing":
        art.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "inspect", str(art), "--key", str(key))
    assert_one_line_error(code, err)
    assert code == 6


def test_console_scripts_installed() -> None:
    for script in ("edgefleet", "edgefleet-agent"):
        exe = shutil.which(script) or str(Path(sys.executable).parent / script)
        proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_factory_that_raises_is_one_line(
    digits: DigitsProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _variant(
        digits, tmp_path, **{'factory = "model.py:build_cnn"': 'factory = "broken.py:build"'}
    )
    (cfg.parent / "broken.py").write_text("def build():\n    raise RuntimeError('no GPU found')\n")
    code, _, err = run_cli(
        capsys,
        "build",
        str(cfg),
        "-p",
        "generic-cpu",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert_one_line_error(code, err, "factory 'broken.py:build' failed: RuntimeError: no GPU found")
    assert code == 4


def test_onnx_input_builds_and_skips_torch_only_recipes(
    built: tuple[Path, dict],
    digits: DigitsProject,  # type: ignore[type-arg]
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    from builder.passes.load import resolve_factory

    # The trained digits CNN as a plain fp32 ONNX file, the way a user would bring one.
    module = resolve_factory("model.py:build_cnn", digits.dir)()
    module.load_state_dict(torch.load(digits.work / "digits_cnn.pt", weights_only=True))
    (tmp_path / "src").mkdir()
    torch.onnx.export(
        module.eval(),
        (torch.zeros(2, 1, 8, 8),),
        str(tmp_path / "src" / "model.onnx"),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
    )
    cfg = _variant(
        digits,
        tmp_path,
        **{
            'factory = "model.py:build_cnn"\nweights = "work/digits_cnn.pt"': f'onnx = "{tmp_path / "src" / "model.onnx"}"',
        },
    )
    code, out, _ = run_cli(
        capsys,
        "build",
        str(cfg),
        "-p",
        "x86-ipc",
        "--out",
        str(tmp_path / "o"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--json",
    )
    assert code == 0, _
    cands = {c["recipe"]: c for c in json.loads(out)["profiles"][0]["candidates"]}
    assert cands["pruned_int8_static"]["error"] == "needs a PyTorch model (input is ONNX)"
    assert cands["int8_static"]["fits"] and cands["int8_static"]["metrics"]["top1_drop_pt"] <= 1.0
    assert [s["pass"] for s in cands["int8_static"]["steps"]] == ["simplify", "quantize"]


def test_regression_metrics_use_cosine_and_error() -> None:
    from builder.evaluate.accuracy import compare

    ref = {"y": np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)}
    out = {"y": np.array([[1.0, 0.1], [0.0, 2.0]], np.float32)}
    m = compare(ref, out, None, "regression")
    assert (
        "top1" not in m
        and m["cosine_mean"] < 1.0
        and m["cosine_min"] == pytest.approx(0.995037, abs=1e-5)
    )
    assert m["max_abs_err"] == pytest.approx(0.1, abs=1e-6)
    c = compare(ref, out, np.array([0, 1]), "classification")
    assert c["top1"] == 1.0 and c["top1_drop_pt"] == 0.0 and c["top1_agreement"] == 1.0
