"""Chunk store resume and atomic activation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.errors import IntegrityError
from agent.protocol.artifact import verify_artifact
from agent.protocol.messages import ArtifactAnnouncement, ChunkRef
from agent.protocol.signing import load_public_key
from agent.store.chunks import ChunkStore
from agent.store.versions import VersionStore
from tests.agent_helpers import make_artifact, make_keys


def _ann(data: bytes, chunk: int) -> ArtifactAnnouncement:
    chunks = [
        ChunkRef(
            size=len(data[i : i + chunk]), sha256=hashlib.sha256(data[i : i + chunk]).hexdigest()
        )
        for i in range(0, len(data), chunk)
    ]
    return ArtifactAnnouncement(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk,
        chunks=chunks,
        name="m",
        version="1",
        profile="p",
        runtime="onnxruntime",
        manifest={},
        signature="",
    )


def test_chunk_store_resumes_and_rechecks(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    ann = _ann(data, 1000)
    s = ChunkStore(tmp_path, ann)
    for i in (0, 3, 7):
        assert s.write(i, data[i * 1000 : (i + 1) * 1000])
    assert not s.write(3, data[3000:4000])  # duplicate
    with pytest.raises(IntegrityError, match="sha256"):
        s.write(4, b"\0" * 1000)
    with pytest.raises(IntegrityError, match="bytes"):
        s.write(5, b"\0" * 10)
    # a restart: done chunks are found again, and a chunk corrupted on disk is fetched again
    with s.part.open("r+b") as fh:
        fh.seek(7000)
        fh.write(b"X")
    s2 = ChunkStore(tmp_path, ann)
    assert s2.resumed_chunks == 2
    assert s2.missing() == [1, 2, 4, 5, 6, 7, 8, 9]
    for i in s2.missing():
        s2.write(i, data[i * 1000 : (i + 1) * 1000])
    path = s2.finish()
    assert path.read_bytes() == data
    assert ChunkStore(tmp_path, ann).complete


def test_finish_refuses_wrong_whole_hash(tmp_path: Path) -> None:
    data = os.urandom(3000)
    ann = _ann(data, 1000).model_copy(update={"sha256": "0" * 64})
    s = ChunkStore(tmp_path, ann)
    for i in range(3):
        s.write(i, data[i * 1000 : (i + 1) * 1000])
    with pytest.raises(IntegrityError):
        s.finish()


def test_activation_is_a_symlink_swap_and_prunes(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "k")
    pub = [load_public_key(keys.public)]
    vs = VersionStore(tmp_path / "state", keep=1)
    installed = []
    for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0")):
        va = verify_artifact(make_artifact(tmp_path / "a", keys, version=v, seed=i), pub)
        inst = vs.unpack(va)
        vs.activate(inst)
        installed.append(inst)
        active = vs.active()
        assert active is not None and active.sha256 == va.sha256
        assert os.readlink(vs.active_link) == f"versions/{inst.dir.name}"
    assert vs.previous() == installed[1]
    assert vs.prune() == [installed[0].dir.name]
    assert vs.history() == [installed[1].dir.name, installed[2].dir.name]
    # a crash mid-swap leaves a stray temp link; the active pointer is untouched and it is cleaned
    os.symlink("versions/nowhere", tmp_path / "state" / ".active.tmp")
    (vs.versions / ".tmp-partial").mkdir()
    vs.clean_partial()
    assert not (vs.versions / ".tmp-partial").exists()
    assert vs.active() == installed[2]
    vs.forget(installed[1])
    assert vs.previous() is None
