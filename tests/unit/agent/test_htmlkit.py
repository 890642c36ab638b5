"""The one escape both HTML reports use: any text is inert in element content and attributes."""

from __future__ import annotations

import html

from hypothesis import given
from hypothesis import strategies as st

from agent.htmlkit import esc


@given(st.text())
def test_esc_leaves_no_markup_and_round_trips(text: str) -> None:
    out = esc(text)
    assert not set("<>\"'") & set(out)
    assert html.unescape(out) == text


def test_esc_takes_any_value() -> None:
    assert esc(3.5) == "3.5"
    assert esc(None) == "None"
