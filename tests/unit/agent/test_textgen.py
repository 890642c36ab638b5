"""The text-generation interface and its fake: params, stop strings, cancel, streaming text."""

from __future__ import annotations

import threading

import pytest

from agent.errors import UsageError
from agent.runtime.textgen import GenParams, StopMatcher, Token, apply_stops
from tests.textgen_fake import FakeGenerator


def _text(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


def test_params_are_checked() -> None:
    with pytest.raises(UsageError, match="max_new_tokens"):
        GenParams(max_new_tokens=0)
    with pytest.raises(UsageError, match="temperature"):
        GenParams(temperature=-1)
    with pytest.raises(UsageError, match="top_p"):
        GenParams(top_p=0)


def test_fake_round_trips_and_streams_multibyte_text() -> None:
    gen = FakeGenerator(reply="héllo ✓")
    ids = gen.encode(gen.chat_prompt([{"role": "user", "content": "hi"}]))
    assert gen.decode(ids) == "<|user|>hi\n<|assistant|>"
    tokens = list(gen.generate(ids, GenParams()))
    assert _text(tokens) == "héllo ✓"
    assert [t.id for t in tokens] == gen.reply_ids(ids)
    assert any(t.text == "" for t in tokens)  # a token ending mid-character adds no text yet


def test_max_new_tokens_and_cancel() -> None:
    gen = FakeGenerator(reply="abcdef")
    assert _text(list(gen.generate([], GenParams(max_new_tokens=3)))) == "abc"
    cancel = threading.Event()
    out = []
    for tok in gen.generate([], GenParams(), cancel):
        out.append(tok)
        cancel.set()
    assert _text(out) == "a"
    assert gen.active == 0 and gen.calls == 2


@pytest.mark.parametrize(
    ("reply", "stop", "expected"),
    [
        ("one two. three", (".",), "one two"),
        ("one two. three", ("two.",), "one "),
        ("abcabd", ("abd",), "abc"),
        ("abcab", ("abd",), "abcab"),  # a held prefix that never completes is released at the end
        ("no stop here", ("zz", ""), "no stop here"),
    ],
)
def test_stop_strings_are_not_yielded(reply: str, stop: tuple[str, ...], expected: str) -> None:
    gen = FakeGenerator(reply=reply)
    tokens = list(gen.generate([], GenParams(stop=stop)))
    assert _text(tokens) == expected
    if expected == reply:
        assert [t.id for t in tokens] == gen.reply_ids([])


def test_stop_matcher_holds_possible_prefixes() -> None:
    m = StopMatcher(("</s>",))
    assert m.feed("hi <") == ("hi ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("x") == ("</x", False)
    assert m.feed("</s> more") == ("", True)


def test_apply_stops_without_stops_passes_everything() -> None:
    pieces = iter([(5, "a"), (6, ""), (7, "b")])
    assert list(apply_stops(pieces, ())) == [Token(5, "a"), Token(6, ""), Token(7, "b")]


def test_fake_counts_concurrency_and_refuses_after_close() -> None:
    gen = FakeGenerator(reply="ab")
    it1 = gen.generate([], GenParams())
    it2 = gen.generate([], GenParams())
    next(it1)
    next(it2)
    assert gen.max_active == 2
    list(it1)
    list(it2)
    gen.close()
    with pytest.raises(RuntimeError):
        list(gen.generate([], GenParams()))
