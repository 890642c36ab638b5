"""The prune selection: a pure function from retained topics to what goes."""

from __future__ import annotations

import hashlib
import json

import pytest

from agent.protocol import topics
from fleet.artifacts import Retained, inventory, plan, reference

NOW = 1_800_000_000.0


def _sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def _artifact(r: Retained, name: str, version: str, profile: str = "cpu", chunks: int = 3) -> str:
    sha = _sha(f"{name}{version}{profile}")
    for i in range(chunks):
        r.add(topics.artifact_chunk(sha, i), b"x" * 1000)
    ann = {
        "sha256": sha,
        "name": name,
        "version": version,
        "profile": profile,
        "size": 1000 * chunks,
        "chunks": [{"size": 1000, "sha256": _sha(str(i))} for i in range(chunks)],
        "published": f"2026-01-0{version[0]}T00:00:00Z",
    }
    r.add(topics.artifact_manifest(sha), json.dumps(ann).encode())
    entry = {"name": name, "version": version, "profile": profile, "sha256": sha, "size": 3000}
    r.add(topics.artifact_index(name, version, profile), json.dumps(entry).encode())
    return sha


def _deploy(r: Retained, topic: str, sha: str, expires: str = "2030-01-01T00:00:00Z") -> None:
    env = {
        "signed": {"type": "deployment", "expires": expires, "body": {"sha256": sha, "name": "m"}},
        "signatures": [],
    }
    r.add(topic, json.dumps(env).encode())


@pytest.fixture
def four() -> tuple[Retained, list[str]]:
    r = Retained()
    shas = [_artifact(r, "m", f"{v}.0.0") for v in (1, 2, 3, 4)]
    return r, shas


def test_keeps_newest_and_deployed(four: tuple[Retained, list[str]]) -> None:
    r, (s1, s2, s3, s4) = four
    _deploy(r, topics.device_topic("d1", "deployment"), s1)
    _deploy(r, topics.group_deployment("lab"), s2, expires="2020-01-01T00:00:00Z")
    p = plan(r, keep=1, now=NOW)
    assert [a.sha256 for a in p.remove] == [s3]
    assert {a.sha256 for a in p.keep} == {s1, s2, s4}
    gone = p.topics
    assert len(gone) == 5  # index entry, manifest, 3 chunks
    assert topics.parse(gone[0]).kind == "index"  # type: ignore[union-attr]
    assert topics.parse(gone[1]).kind == "manifest"  # type: ignore[union-attr]
    assert p.bytes_freed == sum(r.sizes[t] for t in gone)
    # an expired deployment still protects its artifact, and the listing says it is expired
    inv = inventory(r, NOW)
    assert [x.expired for x in inv.artifacts[s2].refs] == [True]
    assert [x.expired for x in inv.artifacts[s1].refs] == [False]
    assert [x.target for x in inv.artifacts[s1].refs] == ["device d1"]


def test_keep_zero_and_default(four: tuple[Retained, list[str]]) -> None:
    r, (s1, s2, s3, s4) = four
    assert {a.sha256 for a in plan(r, keep=0, now=NOW).remove} == {s1, s2, s3, s4}
    assert {a.sha256 for a in plan(r, now=NOW).remove} == {s1, s2}
    assert plan(r, keep=10, now=NOW).remove == []


def test_lines_are_name_and_profile() -> None:
    r = Retained()
    a = _artifact(r, "m", "1.0.0", "cpu")
    b = _artifact(r, "m", "1.0.0", "gpu")
    c = _artifact(r, "m", "2.0.0", "gpu")
    d = _artifact(r, "other", "1.0.0", "cpu")
    p = plan(r, keep=1, now=NOW)
    assert [x.sha256 for x in p.remove] == [b]
    assert {x.sha256 for x in p.keep} == {a, c, d}


def test_versions_compare_as_numbers() -> None:
    r = Retained()
    s9 = _artifact(r, "m", "9.0.0")
    s10 = _artifact(r, "m", "10.0.0")
    assert [x.sha256 for x in plan(r, keep=1, now=NOW).remove] == [s9]
    assert s10


def test_orphans_and_cleared_topics() -> None:
    r = Retained()
    sha = _sha("orphan")
    r.add(topics.artifact_chunk(sha, 0), b"y" * 10)  # chunks of a half-published artifact
    kept = _artifact(r, "m", "1.0.0")
    r.add(topics.artifact_chunk(kept, 2), b"")  # cleared: not retained any more
    inv = inventory(r, NOW)
    assert inv.artifacts[kept].chunks == 2 and not inv.artifacts[kept].complete
    p = plan(r, keep=1, now=NOW)
    assert [x.sha256 for x in p.remove] == [sha]
    # a deployment of an artifact not on the broker is a warning, not a crash
    _deploy(r, topics.device_topic("d", "deployment"), _sha("gone"))
    r.add(topics.group_deployment("g"), b"not json")
    w = plan(r, keep=1, now=NOW).warnings
    assert any("not on the broker" in x for x in w) and any("not a signed" in x for x in w)


def test_reference_reads_signed_body() -> None:
    env = {"signed": {"expires": "2020-01-01T00:00:00Z", "body": {"sha256": "ab", "version": "1"}}}
    ref = reference(topics.group_deployment("lab"), json.dumps(env).encode(), NOW)
    assert not isinstance(ref, str)
    assert (ref.target, ref.sha256, ref.version, ref.expired) == ("group lab", "ab", "1", True)
