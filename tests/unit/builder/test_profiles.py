"""Device profiles: the shipped ones are valid; mistakes name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.protocol.profile import get_profile, load_profile, load_profiles
from builder.cli import main


def test_shipped_profiles_load(profiles_dir: Path) -> None:
    profiles = load_profiles(profiles_dir)
    assert {"rpi4", "jetson-orin-nano", "x86-ipc", "generic-cpu"} <= set(profiles)
    assert profiles["x86-ipc"].build.candidates[0] == "int8_static"
    assert (
        profiles["jetson-orin-nano"].runtime.execution_providers[0] == "TensorrtExecutionProvider"
    )
    assert "fp16" in profiles["jetson-orin-nano"].build.candidates


def test_profiles_cover_every_kind_of_candidate(profiles_dir: Path) -> None:
    """Between them the shipped profiles try every compression the builder has; rpi4 runs LiteRT."""
    from builder.recipes import RECIPES

    profiles = load_profiles(profiles_dir)
    every = {c for p in profiles.values() for c in p.build.candidates}
    assert every <= set(RECIPES)
    assert {
        "fp32",
        "fp16",
        "int8_dynamic",
        "int8_static",
        "pruned_int8_static",
        "distilled_int8_static",
        "lowrank_int8_static",
        "tflite_fp32",
        "tflite_int8_dynamic",
        "tflite_int8",
    } <= every
    rpi = profiles["rpi4"]
    assert rpi.runtime.name == "litert" and rpi.build.candidates[0] == "tflite_int8"
    # ONNX recipes on rpi4 are the fallback: after every TFLite one.
    tfl = [i for i, c in enumerate(rpi.build.candidates) if "tflite" in c]
    onnx = [i for i, c in enumerate(rpi.build.candidates) if "tflite" not in c]
    assert onnx and max(tfl) < min(onnx)


def _write(tmp_path: Path, text: str, name: str = "dev") -> Path:
    src = (Path(__file__).resolve().parents[3] / "device_profiles" / "generic-cpu.toml").read_text()
    p = tmp_path / f"{name}.toml"
    p.write_text(src.replace('name = "generic-cpu"', f'name = "{name}"') + text)
    return p


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, "\n[extra]\nturbo = true\n")
    with pytest.raises(ConfigError) as e:
        load_profile(p)
    assert str(p) in str(e.value) and "extra: unknown key" in str(e.value)


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    p = _write(tmp_path, "")
    p.write_text(p.read_text().replace("max_p95_ms = 10.0", 'max_p95_ms = "fast"'))
    with pytest.raises(ConfigError, match=r"budgets\.max_p95_ms: Input should be a valid number"):
        load_profile(p)


def test_name_must_match_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "", name="a")
    p.rename(tmp_path / "b.toml")
    with pytest.raises(ConfigError, match="does not match the file name"):
        load_profile(tmp_path / "b.toml")


def test_unknown_profile_lists_known(profiles_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*rpi4"):
        get_profile("nope", profiles_dir)


def test_profiles_command_json(capsys: pytest.CaptureFixture[str], profiles_dir: Path) -> None:
    assert main(["profiles", "--dir", str(profiles_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in doc} >= {"rpi4", "x86-ipc"}
    assert all("max_p95_ms" in p["budgets"] for p in doc)


def test_profiles_command_table(capsys: pytest.CaptureFixture[str], profiles_dir: Path) -> None:
    assert main(["profiles", "--dir", str(profiles_dir)]) == 0
    out = capsys.readouterr().out
    assert "jetson-orin-nano" in out and "int8_static" in out
