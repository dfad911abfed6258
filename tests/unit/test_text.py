"""Streaming text never emits half a UTF-8 character and never leaks any part of a stop string, wherever the token
boundaries fall."""

from __future__ import annotations

import pytest

from serve_app.engine.text import StopMatcher, Utf8Stream


def test_multibyte_characters_split_across_pieces() -> None:
    text = "héllo wörld 🚀 ok"
    data = text.encode()
    s = Utf8Stream()
    out = "".join(s.push(data[i:i + 1]) for i in range(len(data))) + s.flush()
    assert out == text
    s = Utf8Stream()
    parts = [s.push(data[i:i + 1]) for i in range(len(data))]
    assert all("\ufffd" not in p for p in parts)


@pytest.mark.parametrize("cut", range(1, 12))
def test_stop_found_at_any_split(cut: int) -> None:
    text = "abc STOP! def"
    m = StopMatcher(["STOP!"])
    a, s1 = m.push(text[:cut])
    b, s2 = (m.push(text[cut:]) if not s1 else ("", True))
    assert s1 or s2
    assert a + b == "abc "


def test_partial_prefix_is_held_then_released() -> None:
    m = StopMatcher(["</end>"])
    assert m.push("hello </e") == ("hello ", False)
    assert m.push("xit") == ("</exit", False)
    assert m.flush() == ""
    m2 = StopMatcher(["</end>"])
    assert m2.push("tail </") == ("tail ", False)
    assert m2.flush() == "</"


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == ("hel", True)


def test_no_stops_passthrough() -> None:
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)
