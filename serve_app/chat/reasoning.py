"""Splitting a reasoning model's ``<think>...</think>`` from its answer, incrementally.

The thinking is the text between ``<think>`` and ``</think>`` at the start of the output, or, when the template
opened ``<think>`` in the generation prompt (DeepSeek-R1 distills), everything up to ``</think>`` (or up to a text
that also ends it, which stays in the answer). An unclosed block (the budget ran out mid-thought) is all reasoning,
as llama-server reports it. Pure.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


class ThinkSplitter:
    def __init__(self, opened: bool, ends: tuple[str, ...] = ()) -> None:
        self.state = "thinking" if opened else "start"
        self.buf = ""
        self.started = False  # some reasoning went out already
        # Texts that also end the thinking and start the answer (kept in it): Qwen3.5 may open a tool call
        # without closing </think> first, and llama-server reads that call as the answer.
        self.ends = ends

    def _trim(self, reasoning: str) -> str:
        # Models write "<think>\n": the newline opening the thoughts is not part of them.
        if not self.started:
            reasoning = reasoning.lstrip()
            self.started = bool(reasoning)
        return reasoning

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) settled by this text."""
        self.buf += text
        return self._scan(final=False)

    def finish(self) -> tuple[str, str]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, str]:
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(OPEN):
                self.state, self.buf = "thinking", head[len(OPEN):]
            elif OPEN.startswith(head) and not final:
                return "", ""  # maybe the start of <think>: wait
            else:
                self.state = "content"
        if self.state == "thinking":
            at, end = self._end()
            if at >= 0:
                reasoning = self.buf[:at]
                self.buf = self.buf[at + len(CLOSE):].lstrip() if end == CLOSE else self.buf[at:]
                self.state = "after"
            else:
                hold = 0 if final else max(_held(self.buf, m) for m in (CLOSE, *self.ends))
                reasoning, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
                return self._trim(reasoning), ""
        if self.state == "after":
            # The whitespace right after </think> is layout, not answer: drop it even when it streams separately.
            self.buf = self.buf.lstrip()
            if self.buf:
                self.state = "content"
        if self.state == "content":
            content, self.buf = self.buf, ""
        return self._trim(reasoning), content

    def _end(self) -> tuple[int, str]:
        """Where the thinking ends and by which text; -1 while it goes on."""
        hits = [(at, m) for m in (CLOSE, *self.ends) if (at := self.buf.find(m)) >= 0]
        return min(hits) if hits else (-1, CLOSE)


def _held(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0

