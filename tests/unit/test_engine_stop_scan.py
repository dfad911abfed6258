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
