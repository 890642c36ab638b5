"""Manifest schema, canonical JSON, signatures and artifact verification (every byte counts)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import IntegrityError
from agent.protocol.artifact import extract_verified, verify_artifact
from agent.protocol.canonical import canonical_json
from agent.protocol.golden import GoldenSet
from agent.protocol.manifest import (
    Golden,
    Manifest,
    ModelInfo,
    Recipe,
    TensorSpec,
    parse_manifest,
    version_key,
)
from agent.protocol.signing import generate_keypair, load_private_key, load_public_key
from builder.package import file_entry, write_artifact

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_canonical_json_is_a_fixed_point(value: object) -> None:
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once


@given(st.dictionaries(st.text(), st.integers(), min_size=2))
def test_canonical_json_ignores_key_order(d: dict[str, int]) -> None:
    reordered = dict(reversed(list(d.items())))
    assert canonical_json(d) == canonical_json(reordered)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(("a", "b"), [("1.2", "1.10"), ("1.9.9", "2"), ("0.0.1", "0.1")])
def test_version_ordering(a: str, b: str) -> None:
    assert version_key(a) < version_key(b)
    assert version_key("1.2") == version_key("1.2.0")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w"
    )
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_artifact(tmp: Path, key: Path, **overrides: object) -> Path:
    _tiny_onnx(tmp / "model.onnx")
    x = np.ones((2, 4), np.float32)
    GoldenSet(
        {"input": x},
        {"output": np.zeros((2, 3), np.float32)},
        {"output": np.zeros((2, 3), np.float32)},
    ).save(tmp / "golden.npz")
    files = {"model.onnx": tmp / "model.onnx", "golden.npz": tmp / "golden.npz"}
    fields: dict[str, object] = dict(
        format_version=1,
        name="tiny",
        version="1.0.0",
        profile="generic-cpu",
        runtime="onnxruntime",
        precision="fp32",
        task="regression",
        created="2026-01-01T00:00:00+00:00",
        builder_version="test",
        model=ModelInfo(
            file="model.onnx",
            inputs=[TensorSpec(name="input", dtype="float32", shape=["batch", 4])],
            outputs=[TensorSpec(name="output", dtype="float32", shape=["batch", 3])],
        ),
        files={k: file_entry(v) for k, v in files.items()},
        metrics={"top1": 0.5},
        recipe=Recipe(name="fp32", steps=[]),
        golden=Golden(file="golden.npz", count=2, atol=1e-4, rtol=0),
    )
    fields.update(overrides)
    m = Manifest(**fields)  # type: ignore[arg-type]
    return write_artifact(tmp / m.artifact_name, m, files, load_private_key(key))


def test_round_trip_and_extract(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    va = verify_artifact(art, [load_public_key(keys[1])])
    assert va.manifest.name == "tiny" and va.manifest.files["model.onnx"].size > 0
    extract_verified(va, tmp_path / "x")
    assert (tmp_path / "x" / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    # Deterministic: the same manifest and files make the same bytes (ed25519 is deterministic).
    (tmp_path / "again").mkdir()
    assert make_artifact(tmp_path / "again", keys[0]).read_bytes() == art.read_bytes()


def test_changing_any_byte_is_detected(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    trusted = [load_public_key(keys[1])]
    good = art.read_bytes()
    bad = tmp_path / "bad.efa"
    # Every byte of the first 4 KiB (headers, manifest, signature) and a stride through the rest,
    # padding and end-of-archive blocks included.
    positions = sorted(
        set(range(0, min(4096, len(good)))) | set(range(4096, len(good), 97)) | {len(good) - 1}
    )
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            verify_artifact(bad, trusted)
    bad.write_bytes(good[:-512])
    with pytest.raises(IntegrityError):
        verify_artifact(bad, trusted)
    bad.write_bytes(good + b"\0" * 512)
    with pytest.raises(IntegrityError):
        verify_artifact(bad, trusted)


def test_unknown_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    art = make_artifact(tmp_path, keys[0])
    _, other_pub = generate_keypair(tmp_path / "other")
    with pytest.raises(IntegrityError, match="unknown key"):
        verify_artifact(art, [load_public_key(other_pub)])


def _rewrite(art: Path, out: Path, mutate: object) -> Path:
    with tarfile.open(art) as src, tarfile.open(out, "w:") as dst:
        members = [(m, src.extractfile(m).read()) for m in src]  # type: ignore[union-attr]
        for m, data in mutate(members):  # type: ignore[operator]
            dst.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return out


@pytest.mark.parametrize(
    "case", ["traversal", "absolute", "symlink", "extra", "unsigned", "resigned_manifest"]
)
def test_malformed_tars_are_refused(tmp_path: Path, keys: tuple[Path, Path], case: str) -> None:
    art = make_artifact(tmp_path, keys[0])

    def mutate(members: list[tuple[tarfile.TarInfo, bytes]]) -> list[tuple[tarfile.TarInfo, bytes]]:
        if case in ("traversal", "absolute"):
            members[-1][0].name = "../evil" if case == "traversal" else "/etc/evil"
        elif case == "symlink":
            link = tarfile.TarInfo("golden.npz")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            members = [m for m in members if m[0].name != "golden.npz"] + [(link, b"")]
        elif case == "extra":
            extra = tarfile.TarInfo("payload.sh")
            extra.size = 4
            members.append((extra, b"boom"))
        elif case == "unsigned":
            members = [m for m in members if m[0].name != "manifest.sig"]
        elif case == "resigned_manifest":
            doc = json.loads(members[0][1])
            doc["version"] = "9.9.9"
            data = canonical_json(doc)
            members[0][0].size = len(data)
            members[0] = (members[0][0], data)
        return members

    bad = _rewrite(art, tmp_path / "bad.efa", mutate)
    with pytest.raises(IntegrityError):
        verify_artifact(bad, [load_public_key(keys[1])])


def test_manifest_rejects_unknown_fields_and_bad_versions() -> None:
    with pytest.raises(IntegrityError, match="format_version"):
        parse_manifest({"format_version": 99})
    with pytest.raises(IntegrityError, match="unknown key"):
        parse_manifest({"format_version": 1, "surprise": True})


@settings(max_examples=50)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash_the_verifier(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "x.efa"
    p.write_bytes(data)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with pytest.raises(IntegrityError):
        verify_artifact(p, [Ed25519PrivateKey.generate().public_key()])
