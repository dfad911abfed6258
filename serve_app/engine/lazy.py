"""The Python side of a lazy grammar: where its trigger appears, and which tokens may complete it.

llama.cpp's lazy grammar buffers the free text and, on the token that completes a trigger, replays the text from
the trigger's start into the grammar. A token whose piece runs past the trigger into text the grammar refuses makes
llama.cpp throw inside the C API, which aborts the process. So the engine asks ``completes_badly`` before it lets a
free token through: a token that completes a trigger must leave text that is the start of the grammar's literal
prefix when the prefix begins with that trigger; a trigger that is instead the start of the grammar's own text (a
JSON call's ``{"name"``, checked against the grammar when it is compiled) must end exactly where the token ends.
No llama.cpp here.
"""

from __future__ import annotations

from collections.abc import Callable


class TriggerWatch:
    """Mirrors llama.cpp's trigger search over the bytes generated so far (only a tail of them is kept: a match
    that starts earlier would have fired earlier)."""

    def __init__(self, triggers: tuple[str, ...], prefix: str, piece: Callable[[int], bytes]) -> None:
        self.triggers = [t.encode() for t in triggers]
        self.prefix = prefix.encode()
        self.piece = piece
        self.keep = max(len(t) for t in self.triggers) - 1
        self.tail = b""
        self.fired = False

    def _match(self, tok: int) -> bytes | None:
        """The text the grammar would be fed if ``tok`` came next (None: no trigger yet)."""
        buf = self.tail + self.piece(tok)
        starts = [i for i in (buf.find(t) for t in self.triggers) if i >= 0]
        return buf[min(starts):] if starts else None

    def completes_badly(self, tok: int) -> bool:
        fed = self._match(tok)
        if fed is None:
            return False
        for t in self.triggers:
            if fed.startswith(t) and (self.prefix.startswith(fed) if self.prefix.startswith(t) else fed == t):
                return False
        return True

    def push(self, tok: int) -> None:
        if self._match(tok) is not None:
            self.fired = True
            return
        buf = self.tail + self.piece(tok)
        self.tail = buf[max(0, len(buf) - self.keep):] if self.keep else b""
