"""Stop-string scanning stays linear in the output: each push searches only the new text plus a held tail shorter
than the longest stop string, never the text accumulated so far (checked by counting, not by timing)."""

from __future__ import annotations

from serve_app.engine.text import StopMatcher


def test_each_push_rescans_at_most_the_longest_stop_string() -> None:
    stops = ["</answer>", "STOP"]
    m = StopMatcher(stops)
    longest = max(len(s) for s in stops)
    # Near misses on every token keep a partial stop string held as long as possible.
    pieces = ["</answe", "r", "x ", "ST", "O", "p", "</", "a"] * 2_000
    emitted = []
    for p in pieces:
        out, stopped = m.push(p)
        assert not stopped
        emitted.append(out)
        assert len(m._held) <= longest - 1
    total = sum(len(p) for p in pieces)
    assert m.scanned <= total + len(pieces) * (longest - 1)
    assert "".join(emitted) + m.flush() == "".join(pieces)


def test_scanned_grows_with_the_pushes_not_with_the_output_so_far() -> None:
    m = StopMatcher(["<|end|>"])
    per_push = []
    for _ in range(5_000):
        before = m.scanned
        m.push("token ")
        per_push.append(m.scanned - before)
    assert max(per_push) <= len("token ") + len("<|end|>") - 1
    assert per_push[-1] == per_push[10]  # the 5000th token costs what the 10th did


def test_a_long_hostile_stop_string_costs_one_look_per_character() -> None:
    """The classic worst case for naive suffix checks: a long run of one character against a stop string made of
    that run plus one other character. Each character is examined once per stop, whatever the stop's length."""
    stop = "a" * 1000 + "b"
    m = StopMatcher([stop, "zz"])
    pushed, emitted = 0, []
    for _ in range(200):
        out, stopped = m.push("a" * 50)
        pushed += 50
        emitted.append(out)
        assert not stopped and len(m._held) <= len(stop) - 1
    assert m.scanned == pushed
    out, stopped = m.push("b and more")
    assert stopped and "".join(emitted) + out == "a" * (pushed - 1000)


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The stop that completes first (the longest on a tie), found on the whole text at once."""
    best: tuple[int, int] | None = None  # (end, -length)
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < best):
            best = (i + len(s), -len(s))
    if best is None:
        return text, False
    return text[: best[0] + best[1]], True


def test_any_split_of_the_text_gives_what_the_whole_text_gives() -> None:
    import random

    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        m = StopMatcher(stops)
        out, stopped, i = [], False, 0
        while i < len(text) and not stopped:
            j = i + rng.randint(1, 4)
            piece, stopped = m.push(text[i:j])
            out.append(piece)
            i = j
        if not stopped:
            out.append(m.flush())
        assert ("".join(out), stopped) == reference(text, stops), (text, stops)
