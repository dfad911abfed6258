"""The host-memory prompt cache on real llama.cpp (tiny generated model, no Ray): a conversation whose slot another
prefix took is saved to RAM and loaded back, so its next request reuses its prefix (``cached_tokens`` > 0 on a
one-slot engine) with the greedy output of a full prefill; the cache holds at most its byte bound, dropping the
least recently used copy first; a copy loads into another slot than the one it came from (separate and unified
KV); ``cache_ram_mib: 0`` turns it off (no host cache at all)."""

from __future__ import annotations

import asyncio

import pytest
from test_prefix_cache import agreement, gen, greedy  # same directory: prepended to sys.path by pytest

from serve_app.config import EngineConfig
from serve_app.engine import load_engine

pytestmark = pytest.mark.timeout(120)

TOPICS = ("llamas grazing on the high plains", "the fox and the lazy dog", "a cache of tokens in memory",
          "hello world programs")


def conversation(model, i: int) -> list[int]:  # noqa: ANN001
    return model.tokenize(f"{TOPICS[i]} make conversation {i}. " * 12, True, False)[:240]  # all the same size


def one_slot(tiny_model, cache_ram_mib: int):  # noqa: ANN001, ANN201
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=1, n_ctx_per_slot=512, prefill_chunk=64,
                                                              cache_ram_mib=cache_ram_mib), want_gpu=False)
    return eng, model


def test_an_evicted_prefix_is_restored_from_ram_and_bounded(tiny_model) -> None:
    eng, model = one_slot(tiny_model, 64)
    host = eng._prefix.host
    assert host is not None
    convs = [conversation(model, i) for i in range(4)]

    async def main() -> None:
        ref, _ = await gen(eng, convs[0], greedy(12, cache=False))
        await gen(eng, convs[1], greedy(4))  # takes the only slot: conversation 0 goes to RAM
        out, d = await gen(eng, convs[0], greedy(12))
        assert d.usage.cached_tokens == len(convs[0]) - 1, d.usage
        assert host.restores == 1 and eng.stats().prompt_cache["ram_restores"] == 1
        assert agreement([(out, ref)]) == 1.0
        # Room for two copies: saving a third drops the least recently used one.
        host.clear()
        eng.drop_prompt_cache()
        await gen(eng, convs[0], greedy(2))
        await gen(eng, convs[1], greedy(2))  # saves 0
        one = host.bytes
        host.max_bytes = int(one * 2.5)
        for i in (2, 3):
            await gen(eng, convs[i], greedy(2))  # saves 1, then 2 (dropping 0)
        assert len(host.entries) == 2 and host.bytes <= host.max_bytes
        _, d0 = await gen(eng, convs[0], greedy(2))  # gone from RAM: computed again
        assert d0.usage.cached_tokens <= 1  # the BOS token a miss still shares with the slot
        _, d2 = await gen(eng, convs[2], greedy(2))
        assert d2.usage.cached_tokens == len(convs[2]) - 1

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


def test_zero_turns_the_host_cache_off(tiny_model) -> None:
    eng, model = one_slot(tiny_model, 0)
    assert eng._prefix.host is None

    async def main() -> None:
        await gen(eng, conversation(model, 0), greedy(2))
        await gen(eng, conversation(model, 1), greedy(2))
        _, d = await gen(eng, conversation(model, 0), greedy(2))
        assert d.usage.cached_tokens <= 1  # the BOS token a miss still shares with the slot

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()


@pytest.mark.parametrize("unified", [False, True])
def test_a_copy_loads_into_another_slot(tiny_model, unified: bool) -> None:  # noqa: ANN001
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=2, n_ctx_per_slot=512, kv_unified=unified,
                                                              cache_ram_mib=64), want_gpu=False)
    convs = [conversation(model, i) for i in range(3)]

    async def main() -> None:
        ref, _ = await gen(eng, convs[0], greedy(12, cache=False))  # slot 0
        await gen(eng, convs[1], greedy(2))  # slot 1
        await gen(eng, convs[2], greedy(2))  # slot 0 (least recently used): conversation 0 goes to RAM
        out, d = await gen(eng, convs[0], greedy(12))  # loaded into slot 1, saved from slot 0
        assert d.usage.cached_tokens == len(convs[0]) - 1 and eng._prefix.host.restores == 1
        assert agreement([(out, ref)]) == 1.0
        assert eng.kv_free()

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
