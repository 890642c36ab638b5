"""Topic build/parse and message encode/decode round trips (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.protocol import topics
from agent.protocol.messages import (
    ArtifactAnnouncement,
    ChunkRef,
    Command,
    Deployment,
    Event,
    MessageError,
    StateMessage,
    decode,
    encode,
)

seg = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
sha = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
version = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}", fullmatch=True)


@st.composite
def any_topic(draw: st.DrawFn) -> topics.Topic:
    kind = draw(
        st.sampled_from(
            [
                "manifest",
                "chunk",
                "index",
                "group_deployment",
                "device_deployment",
                "state",
                "events",
                "telemetry",
                "cmd",
                "cmd_result",
            ]
        )
    )
    if kind == "manifest":
        return topics.Topic(kind, sha256=draw(sha))
    if kind == "chunk":
        return topics.Topic(kind, sha256=draw(sha), index=draw(st.integers(0, 999_999)))
    if kind == "index":
        return topics.Topic(kind, name=draw(seg), version=draw(seg), profile=draw(seg))
    if kind == "group_deployment":
        return topics.Topic(kind, group=draw(seg))
    return topics.Topic(kind, device=draw(seg))  # type: ignore[arg-type]


@given(any_topic())
def test_topic_round_trip(t: topics.Topic) -> None:
    assert topics.parse(topics.build(t)) == t


@given(st.text(max_size=200))
def test_parse_never_raises(s: str) -> None:
    t = topics.parse(s)
    if t is not None:
        assert topics.build(t) == s


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "-lead"])
def test_segments_cannot_inject_levels(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.group_deployment(bad)


@given(
    name=seg.map(str.lower).filter(lambda s: s[0].isalnum()),
    v=version,
    s=sha,
    at=st.text(max_size=30),
)
def test_deployment_round_trip(name: str, v: str, s: str, at: str) -> None:
    d = Deployment(name=name, version=v, sha256=s, size=1, chunks_sha256=s, deployed_at=at)
    assert decode(Deployment, encode(d)) == d


@given(st.integers(1, 5000), st.integers(1, 1000), sha)
def test_announcement_table(size: int, chunk: int, s: str) -> None:
    n = -(-size // chunk)
    chunks = [ChunkRef(size=min(chunk, size - i * chunk), sha256=s) for i in range(n)]
    ann = ArtifactAnnouncement(
        sha256=s,
        size=size,
        chunk_size=chunk,
        chunks=chunks,
        name="m",
        version="1",
        profile="p",
        runtime="onnxruntime",
        manifest={},
        signature="",
    )
    assert ann.table_problem() is None
    assert decode(ArtifactAnnouncement, encode(ann), 10**7) == ann
    wrong = ann.model_copy(update={"size": size + 1})
    assert wrong.table_problem() is not None


def test_other_messages_round_trip() -> None:
    for msg in (
        StateMessage(device="d", online=True, agent_version="0.1", profile="p", seq=3, ts=1.5),
        Event(
            device="d",
            seq=1,
            ts=2.0,
            kind="deployment",
            state="REJECTED",
            reason="why",
            detail={"a": 1},
        ),
        Command(id="x", op="rollback"),
    ):
        assert decode(type(msg), encode(msg)) == msg


@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_only_raises_message_error(data: bytes) -> None:
    for model in (Deployment, Command, ArtifactAnnouncement):
        try:
            decode(model, data)
        except MessageError as exc:
            assert str(exc)


def test_decode_reasons() -> None:
    with pytest.raises(MessageError, match="unknown field"):
        decode(Command, json.dumps({"id": "1", "op": "status", "evil": 1}).encode())
    with pytest.raises(MessageError, match="exceeds"):
        decode(Command, b" " * 70_000)
    with pytest.raises(MessageError, match="not UTF-8 JSON"):
        decode(Command, b"\xff{")
    with pytest.raises(MessageError, match="JSON list"):
        decode(Command, b"[1]")
    with pytest.raises(MessageError, match=r"nested too deeply|not UTF-8 JSON"):
        decode(Command, b"[" * 60_000)
