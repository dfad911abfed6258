"""What every tool-call parser hands back: a whole call, or the verdict that a block is content after all."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON text


class NotACall(ValueError):
    """The text after a trigger is not a well-formed call: it is content after all."""
