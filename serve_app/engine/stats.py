"""What the engine reports about itself: counters, KV use and the state of each slot."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .step import Slot


@dataclass
class EngineStats:
    slots_total: int
    slots_busy: int
    waiting: int
    kv_cells_used: int
    kv_cells_total: int
    steps: int
    tokens_generated: int
    tokens_prompt: int
    dead: str | None
    preemptions: int = 0
    decode_s: float = 0.0
    sample_s: float = 0.0
    busy_s: float = 0.0
    # Prompt caching: cells idle slots keep for reuse, prompt tokens reused (not computed), per-slot state.
    kv_cells_cached: int = 0
    tokens_cached: int = 0
    slots: list[dict[str, Any]] | None = None
    prompt_cache: dict[str, int] | None = None  # the host cache and SWA checkpoints (PrefixCache.report)


def slot_report(slots: list[Slot]) -> list[dict[str, Any]]:
    """Per slot: busy or not, the prompt tokens its idle KV keeps for reuse, and how long it has been idle."""
    now = time.monotonic()
    return [{"slot": s.seq, "busy": s.busy, "cached_tokens": 0 if s.busy else len(s.cache),
             "idle_s": None if s.busy or not s.last_used else round(now - s.last_used, 3)} for s in slots]
