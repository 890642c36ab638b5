"""Text-generation artifacts: a model folder listed file by file, golden prompts in JSON."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import IntegrityError
from agent.protocol.artifact import extract_verified, verify_artifact
from agent.protocol.golden_llm import GoldenPrompts, prefix_mismatch
from agent.protocol.manifest import (
    Golden,
    Manifest,
    ModelInfo,
    Recipe,
    TensorSpec,
    file_name_problem,
    parse_manifest,
)
from agent.protocol.signing import generate_keypair, load_private_key, load_public_key
from builder.package import file_entry, write_artifact

GOLDEN = {
    "prompts": [
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_new_tokens": 4,
            "tokens": [5, 6, 7],
        }
    ]
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def _llm_fields(tmp: Path, **overrides: object) -> tuple[dict[str, object], dict[str, Path]]:
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "genai_config.json").write_text('{"model": {}}')
    (tmp / "model" / "model.onnx").write_bytes(b"onnx")
    (tmp / "golden.json").write_text(json.dumps(GOLDEN))
    files = {
        "model/genai_config.json": tmp / "model" / "genai_config.json",
        "model/model.onnx": tmp / "model" / "model.onnx",
        "golden.json": tmp / "golden.json",
    }
    fields: dict[str, object] = dict(
        format_version=1,
        name="chat",
        version="1.0.0",
        profile="x86-ipc",
        runtime="onnxruntime-genai",
        precision="int4",
        task="text-generation",
        created="2026-01-01T00:00:00+00:00",
        builder_version="test",
        model=ModelInfo(
            file="model",
            inputs=[TensorSpec(name="input_ids", dtype="int64", shape=["batch", "sequence"])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", 8])],
        ),
        files={k: file_entry(v) for k, v in files.items()},
        metrics={},
        recipe=Recipe(name="int4", steps=[]),
        golden=Golden(file="golden.json", count=1, atol=0, rtol=0, prefix_tokens=2),
    )
    fields.update(overrides)
    return fields, files


def test_folder_artifact_round_trips(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    fields, files = _llm_fields(tmp_path)
    m = Manifest(**fields)  # type: ignore[arg-type]
    assert m.folder_files() == ["model/genai_config.json", "model/model.onnx"]
    art = write_artifact(tmp_path / m.artifact_name, m, files, load_private_key(keys[0]))
    va = verify_artifact(art, [load_public_key(keys[1])])
    assert va.manifest.golden.prefix_tokens == 2 and va.manifest.is_text_generation
    extract_verified(va, tmp_path / "x")
    assert (tmp_path / "x" / "model" / "model.onnx").read_bytes() == b"onnx"
    assert not list((tmp_path / "x" / "model").glob(".*"))  # no partial files left


def test_prefix_tokens_is_left_out_when_unset(tmp_path: Path) -> None:
    fields, _ = _llm_fields(tmp_path, golden=Golden(file="golden.json", count=1, atol=0, rtol=0))
    doc = Manifest(**fields).to_dict()  # type: ignore[arg-type]
    assert "prefix_tokens" not in doc["golden"]
    assert parse_manifest(doc).golden.prefix_tokens is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"task": "classification"}, "goes with runtime"),
        ({"runtime": "onnxruntime"}, "goes with runtime"),
        ({"model": "other"}, "no genai_config.json"),
    ],
)
def test_inconsistent_llm_manifests_are_refused(
    tmp_path: Path, override: dict[str, object], needle: str
) -> None:
    fields, _ = _llm_fields(tmp_path)
    doc = Manifest(**fields).to_dict()  # type: ignore[arg-type]
    for key, value in override.items():
        if key == "model":
            doc["model"]["file"] = value
        else:
            doc[key] = value
    with pytest.raises(IntegrityError, match=needle):
        parse_manifest(doc)


@pytest.mark.parametrize(
    "name", ["a/b/c", "../x", "model/..", "/abs", "manifest.json/x", "model/", "a//b", ".hidden/x"]
)
def test_bad_member_names(name: str) -> None:
    assert file_name_problem(name) is not None


def test_a_name_cannot_be_both_file_and_folder(tmp_path: Path) -> None:
    fields, _ = _llm_fields(tmp_path)
    doc = Manifest(**fields).to_dict()  # type: ignore[arg-type]
    doc["files"]["model"] = doc["files"]["golden.json"]
    with pytest.raises(IntegrityError, match="both a file and a folder"):
        parse_manifest(doc)


def test_deeper_tar_members_are_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    fields, files = _llm_fields(tmp_path)
    m = Manifest(**fields)  # type: ignore[arg-type]
    art = write_artifact(tmp_path / m.artifact_name, m, files, load_private_key(keys[0]))
    bad = tmp_path / "bad.efa"
    with tarfile.open(art) as src, tarfile.open(bad, "w:") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "model/model.onnx":
                member.name = "model/sub/model.onnx"
            dst.addfile(member, io.BytesIO(data))
    with pytest.raises(IntegrityError, match="not a plain top-level file name"):
        verify_artifact(bad, [load_public_key(keys[1])])


def test_golden_prompts_parse_and_round_trip(tmp_path: Path) -> None:
    g = GoldenPrompts.parse(GOLDEN)
    assert g.prompts[0].chat() == [{"role": "user", "content": "Hi"}]
    (tmp_path / "g.json").write_text(g.to_json())
    assert GoldenPrompts.load(tmp_path / "g.json") == g


@pytest.mark.parametrize(
    "bad",
    [
        {"prompts": []},
        {"prompts": [{"messages": [], "max_new_tokens": 1, "tokens": [1]}]},
        {
            "prompts": [
                {"messages": [{"role": "bot", "content": ""}], "max_new_tokens": 1, "tokens": [1]}
            ]
        },
        {
            "prompts": [
                {"messages": [{"role": "user", "content": ""}], "max_new_tokens": 0, "tokens": [1]}
            ]
        },
        {"prompts": [], "extra": 1},
    ],
)
def test_bad_golden_prompts_are_refused(bad: object) -> None:
    with pytest.raises(IntegrityError):
        GoldenPrompts.parse(bad)


@given(st.binary(max_size=200))
def test_arbitrary_golden_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(IntegrityError, ValueError, UnicodeDecodeError):
        GoldenPrompts.parse(json.loads(data))


def test_prefix_mismatch() -> None:
    assert prefix_mismatch([1, 2, 3], [1, 2, 9], 2) is None
    assert prefix_mismatch([1, 2, 3], [1, 9, 3], 2) == 1
    assert prefix_mismatch([1, 2, 3], [1], 8) == 1
    assert prefix_mismatch([1, 2], [1, 2, 5], 8) is None
