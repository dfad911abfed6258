"""The engine keys requests on its own ids, never on the client's label, and a stream that goes away at any point
gives its slot and KV cells back: two requests sharing a label never touch each other, and a hundred clients that
disconnect before their first token leave every slot free and the KV cache empty."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serve_app.config import EngineConfig
from serve_app.engine import Engine, RequestStream, load_engine, open_stream
from serve_app.protocol import Delta, Done, SamplingParams

pytestmark = pytest.mark.timeout(120)

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=4, n_ctx_per_slot=256, prefill_chunk=32,
                                                              max_queued_requests=4), want_gpu=False)
    yield eng, model
    eng.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


async def settled(eng: Engine, timeout: float = 5.0) -> bool:
    """True once no slot is busy, nothing waits and llama.cpp holds no KV cell for any sequence."""
    for _ in range(int(timeout / 0.005)):
        st = eng.stats()
        if st.slots_busy == 0 and st.waiting == 0 and eng.kv_free():
            return True
        await asyncio.sleep(0.005)
    return False


def test_closing_one_of_two_streams_with_the_same_label_leaves_the_other_untouched(engine) -> None:
    eng, model = engine
    prompt = model.tokenize(PROMPT, True, False)

    async def main() -> Done:
        first = open_stream(eng, "same-id", prompt, greedy(40))
        second = open_stream(eng, "same-id", prompt, greedy(40))
        seen = 0
        async for ev in second.events():
            seen += isinstance(ev, Delta)
            if seen == 2:
                break  # the second client goes away early
        events = [ev async for ev in first.events()]
        assert isinstance(events[-1], Done), events[-1]
        return events[-1]

    done = asyncio.run(asyncio.wait_for(main(), 20))
    assert done.finish_reason == "length" and done.usage.completion_tokens == 40
    assert asyncio.run(settled(eng))


def test_hundred_streams_closed_before_their_first_token_leak_nothing(engine) -> None:
    eng, model = engine
    prompt = model.tokenize(PROMPT, True, False)

    async def main() -> None:
        for round_ in range(25):
            streams = []
            for i in range(4):
                if i % 2:
                    streams.append(open_stream(eng, "gone", prompt, greedy(200)))
                else:
                    # Submitted, then closed before it is bound to the engine: a client that went away while its
                    # admission was still being awaited.
                    rs = RequestStream("gone", prompt, greedy(200))
                    eng.submit([rs.request])
                    streams.append(rs)
            for i, rs in enumerate(streams):
                rs.close()
                if not i % 2:
                    rs.bind(eng)
            assert await settled(eng, 2.0), (round_, eng.stats())
        st = eng.stats()
        assert st.slots_total - st.slots_busy == eng.n_slots and st.kv_cells_used == 0

    asyncio.run(main())
