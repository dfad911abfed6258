"""The batching engine on real llama.cpp (tiny generated F16 model, no Ray): batched output matches solo output,
sequences finish independently, late joiners are not held back (a request arriving while others decode gets its
first token from the next step that runs), cancellation and completion free KV, stop strings
work across tokens, limits fail before any work, and the memory ladder recovers from a context that does not fit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from serve_app.config import EngineConfig
from serve_app.engine import Engine, EngineRequest, LlamaModelHandle, load_engine, open_stream
from serve_app.engine.generation import check_prompt_tokens
from serve_app.errors import ContextOverflowError, OutOfMemoryError, QueueFullError
from serve_app.protocol import Delta, Done, ErrorEvent, SamplingParams

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=4, n_ctx_per_slot=256, max_queued_requests=4,
                                                              prefill_chunk=32), want_gpu=False)
    yield eng, model
    eng.shutdown()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


async def run(eng: Engine, model: LlamaModelHandle, prompt: str, params: SamplingParams,
              rid: str = "") -> tuple[str, Done | ErrorEvent, list[str]]:
    s = open_stream(eng, rid or prompt, model.tokenize(prompt, True, False), params)
    deltas: list[str] = []
    async for ev in s.events():
        if isinstance(ev, Delta):
            deltas.append(ev.text)
        else:
            return "".join(deltas), ev, deltas
    raise AssertionError("stream ended without a final event")


PROMPTS = [f"the {w} fox and the {i} lazy dog say" for i, w in enumerate("quick brown lazy cache token batch".split())]


def test_concurrent_greedy_equals_solo(loaded) -> None:
    eng, model = loaded

    async def main() -> tuple[list, list]:
        together = await asyncio.gather(*[run(eng, model, p, greedy(24)) for p in PROMPTS])
        alone = [await run(eng, model, p, greedy(24)) for p in PROMPTS]
        return together, alone

    together, alone = asyncio.run(main())
    same = sum(a[0] == b[0] for a, b in zip(together, alone, strict=True))
    # F16 on CPU: a 1-token step takes a different matmul kernel than a batched one (~1e-3 logit noise), so
    # exactness is only expected away from near-ties; with this peaky model every run so far matched 6/6.
    assert same >= len(PROMPTS) - 1, [(a[0], b[0]) for a, b in zip(together, alone, strict=True)]
    assert all(isinstance(t[1], Done) and t[1].usage.completion_tokens == 24 for t in together)


def finish_order(eng: Engine, model: LlamaModelHandle, jobs: list[tuple[str, int, int]],
                 stagger: bool = False) -> tuple[list[str], dict[str, Done]]:
    """Submit (name, prompt index, max_tokens) jobs and record the order in which the ENGINE finishes them (the
    asyncio side may observe completions in a different order when it lags behind the decode thread)."""
    order: list[str] = []
    fins: dict[str, Done] = {}
    done = threading.Event()

    def emitter(name: str):
        def emit(ev) -> None:
            if isinstance(ev, Done | ErrorEvent):
                order.append(name)
                fins[name] = ev
                if len(order) == len(jobs):
                    done.set()
        return emit

    reqs = [EngineRequest(name, model.tokenize(PROMPTS[i], True, False), greedy(n), emitter(name))
            for name, i, n in jobs]
    if not stagger:
        eng.submit(reqs)  # admitted in the same step, as the @serve.batch admission does
    for k, r in enumerate(reqs if stagger else []):
        if k:  # let the earlier requests get into decoding first
            start = eng.stats().tokens_generated
            while eng.stats().tokens_generated < start + 5 and not done.is_set():
                time.sleep(0.0005)
        eng.submit([r])
    assert done.wait(60)
    return order, fins


def test_different_lengths_finish_independently_and_free_kv(loaded) -> None:
    eng, model = loaded
    order, fins = finish_order(eng, model, [("n40", 0, 40), ("n5", 1, 5), ("n20", 2, 20), ("n10", 3, 10)])
    assert order == ["n5", "n10", "n20", "n40"], fins
    assert {k: f.usage.completion_tokens for k, f in fins.items()} == {"n40": 40, "n5": 5, "n20": 20, "n10": 10}
    assert all(f.finish_reason == "length" for f in fins.values())
    st = eng.stats()
    assert eng.kv_free() and st.slots_busy == 0
    # The step-time split the benchmarks report is consistent: decode and sampling are parts of the busy time.
    assert st.decode_s > 0 and st.sample_s > 0 and st.busy_s >= st.decode_s + st.sample_s


def test_late_joiner_finishes_first(loaded) -> None:
    eng, model = loaded
    # The long request is well into decoding when the short one arrives; the short one must not wait for it.
    order, fins = finish_order(eng, model, [("long", 0, 230), ("short", 1, 3)], stagger=True)
    assert order == ["short", "long"]
    assert fins["long"].usage.completion_tokens == 230


def test_arrival_during_decoding_is_admitted_at_the_next_step(loaded) -> None:
    """Closed-loop clients send their next request while the others decode: it must join the very next step (its
    short prompt prefilled there and its first token sampled), not wait for a quiet engine or a timer."""
    eng, model = loaded
    seen: dict[str, int] = {}
    done = threading.Event()

    def emit(ev) -> None:  # runs on the engine thread, right after the step that produced the event
        if isinstance(ev, Done | ErrorEvent):
            seen["steps_at_done"] = eng.steps
            seen["ok"] = isinstance(ev, Done)
            done.set()

    long = EngineRequest("long", model.tokenize(PROMPTS[0], True, False), greedy(200), lambda ev: None)
    eng.submit([long])
    start = eng.stats().tokens_generated
    while eng.stats().tokens_generated < start + 5:
        time.sleep(0.0005)
    steps_at_submit = eng.steps
    # max_tokens 1: the request is done in the step that samples its first token.
    eng.submit([EngineRequest("newcomer", model.tokenize(PROMPTS[1], True, False), greedy(1), emit)])
    assert done.wait(30) and seen["ok"]
    # The step running at submit (if any) ends, then the next one prefills the newcomer and samples its token.
    assert seen["steps_at_done"] <= steps_at_submit + 2, (steps_at_submit, seen)
    eng.cancel(long.key)
    while not eng.kv_free():
        time.sleep(0.001)


def test_cancelled_stream_frees_its_slot(loaded) -> None:
    eng, model = loaded

    async def main() -> None:
        s = open_stream(eng, "cancel-me", model.tokenize(PROMPTS[2], True, False), greedy(200))
        seen = 0
        async for ev in s.events():
            if isinstance(ev, Delta):
                seen += 1
            if seen == 3:
                break  # closing the iterator cancels the request
        steps_at_cancel = eng.steps
        for _ in range(500):
            if eng.stats().slots_busy == 0:
                break
            await asyncio.sleep(0.002)
        assert eng.stats().slots_busy == 0
        assert eng.steps - steps_at_cancel <= 2
        assert eng.kv_free()

    asyncio.run(main())


def test_stop_string_across_token_boundary(loaded) -> None:
    eng, model = loaded

    async def main() -> None:
        text, fin, _ = await run(eng, model, PROMPTS[3], greedy(40))
        # Choose a stop string that starts inside one token and ends inside the next one.
        pieces = [model.piece(t).decode("utf-8", "replace") for t in model.tokenize(text, False, False)]
        assert len(text) > 12
        stop = text[6:12]
        text2, fin2, deltas = await run(eng, model, PROMPTS[3], greedy(40, stop=(stop,)))
        assert isinstance(fin2, Done) and fin2.finish_reason == "stop"
        assert text2 == text[: text.index(stop)]
        assert stop not in "".join(deltas)
        assert pieces  # the reference text really was several tokens

    asyncio.run(main())


def test_limits_fail_before_work(loaded) -> None:
    eng, model = loaded
    too_long = list(range(10, 10 + eng.n_ctx_seq))
    with pytest.raises(ContextOverflowError):
        check_prompt_tokens(too_long, model, eng.n_ctx_seq)

    async def main() -> None:
        with pytest.raises(ContextOverflowError):
            open_stream(eng, "long", too_long, greedy(4))
        # max_tokens beyond the room left finishes with "length" at the slot's end.
        prompt = model.tokenize(PROMPTS[0], True, False)
        s = open_stream(eng, "room", prompt * ((eng.n_ctx_seq - 8) // len(prompt)), greedy(10_000))
        fin = [ev async for ev in s.events()][-1]
        assert isinstance(fin, Done) and fin.finish_reason == "length"
        assert fin.usage.total_tokens <= eng.n_ctx_seq

    asyncio.run(main())
    assert eng.kv_free()


def test_queue_is_bounded(loaded) -> None:
    eng, model = loaded

    async def main() -> None:
        streams = [open_stream(eng, f"q{i}", model.tokenize(PROMPTS[0], True, False), greedy(50))
                   for i in range(eng.max_pending)]
        with pytest.raises(QueueFullError):
            open_stream(eng, "one-too-many", model.tokenize(PROMPTS[0], True, False), greedy(5))
        for s in streams:
            s.close()
        for _ in range(500):
            if eng.stats().slots_busy == 0 and eng.stats().waiting == 0:
                break
            await asyncio.sleep(0.002)
        assert eng.kv_free() and eng.stats().waiting == 0

    asyncio.run(main())


def test_memory_ladder_recovers_and_remembers(tiny_model: Path, tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    cfg = EngineConfig(n_parallel=8, n_ctx_per_slot=4096, memory_budget_mb=2)
    eng, _, report = load_engine(str(tiny_model), cfg, want_gpu=False, profile_path=str(profile))
    try:
        assert report.tried, "the first plan should not have fit"
        assert report.plan["n_parallel"] < 8 or report.plan["n_ctx_per_slot"] < 4096
        assert json.loads(profile.read_text())["plan"] == report.plan
    finally:
        eng.shutdown()
    eng2, _, report2 = load_engine(str(tiny_model), cfg, want_gpu=False, profile_path=str(profile))
    eng2.shutdown()
    assert report2.from_profile and not report2.tried and report2.plan == report.plan
    with pytest.raises(OutOfMemoryError):
        load_engine(str(tiny_model), EngineConfig(memory_budget_mb=1, n_parallel=1, n_ctx_per_slot=256,
                                                  n_batch=64, n_ubatch=64, kv_type="q4_0") , want_gpu=False)


def test_seeded_sampling_is_reproducible_and_mixes_with_greedy(loaded) -> None:
    eng, model = loaded

    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=seed,
                              repeat_penalty=1.1, ignore_eos=True)

    async def main() -> tuple:
        a = await run(eng, model, PROMPTS[0], sampled(42))
        b, g = await asyncio.gather(run(eng, model, PROMPTS[0], sampled(42)), run(eng, model, PROMPTS[1], greedy(24)))
        c = await run(eng, model, PROMPTS[0], sampled(7))
        g_alone = await run(eng, model, PROMPTS[1], greedy(24))
        return a, b, c, g, g_alone

    a, b, c, g, g_alone = asyncio.run(main())
    assert a[0] == b[0]  # same seed, same text, even batched next to a greedy request
    assert a[0] != c[0]
    assert g[0] == g_alone[0]


def test_shutdown_fails_open_streams_instead_of_hanging(tiny_model: Path) -> None:
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=1, n_ctx_per_slot=256, max_queued_requests=2),
                                want_gpu=False)

    async def main() -> list:
        running = open_stream(eng, "running", model.tokenize(PROMPTS[0], True, False), greedy(200))
        queued = open_stream(eng, "queued", model.tokenize(PROMPTS[1], True, False), greedy(5))
        await asyncio.to_thread(eng.shutdown)
        return [[ev async for ev in s.events()][-1] for s in (running, queued)]

    finals = asyncio.run(asyncio.wait_for(main(), 30))
    assert all(isinstance(f, ErrorEvent | Done) for f in finals)
    assert any(isinstance(f, ErrorEvent) and f.error.code == "engine_dead" for f in finals)


def test_full_unified_kv_pauses_the_newest_request_and_resumes_it_without_repeating(tiny_model: Path) -> None:
    """With one shared KV pool, two long requests outgrow it: llama_decode returns 1 (no KV room). The newest one is
    paused with its progress kept, the other finishes, then it resumes by prefilling its prompt and output so far:
    nothing it already streamed comes again, and both get their full length."""
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=2, n_ctx_per_slot=64, kv_unified=True,
                                                              prefill_chunk=32, max_queued_requests=2), want_gpu=False)
    try:
        total = eng.ctx.n_ctx
        assert eng.n_ctx_seq == total  # unified: one request may use the whole pool
        n = int(total * 0.6)  # each fits alone; together they do not

        async def main() -> tuple[list, tuple]:
            both = await asyncio.gather(run(eng, model, PROMPTS[0], greedy(n), "first"),
                                        run(eng, model, PROMPTS[1], greedy(n), "second"))
            # A full prefill in an empty pool, as the resumed request had once the first one finished (the pair's
            # prompt caches dropped: a unified pool's attention depends on the other cells it holds).
            eng.drop_prompt_cache()
            solo = await run(eng, model, PROMPTS[1], greedy(n, cache_prompt=False), "second-alone")
            return both, solo

        both, solo = asyncio.run(main())
        st = eng.stats()
        assert st.preemptions >= 1
        for i, (_, fin, _) in enumerate(both):
            assert isinstance(fin, Done), fin
            assert fin.finish_reason == "length" and fin.usage.completion_tokens == n
            assert fin.usage.prompt_tokens == len(model.tokenize(PROMPTS[i], True, False))  # not the re-prefill
        # The resumed request's stream is its solo text: re-prefilled, not regenerated. Same F16 caveat as above (a
        # resumed sequence's KV comes from a prefill), and a unified pool's attention depends on the other cells it
        # holds (the first request's prompt cache, until the resume's prefill needed its cells): compare by common
        # prefix, which a repeat or a regeneration would break at once.
        common = next((i for i, (x, y) in enumerate(zip(both[1][0], solo[0], strict=False)) if x != y), len(solo[0]))
        assert common >= len(solo[0]) // 2, (both[1][0], solo[0])
        assert st.kv_cells_used == 0 and eng.kv_free()  # idle slots hold only their prompt caches
        eng.drop_prompt_cache()
        assert all(eng.ctx.seq_pos_max(i) == -1 for i in range(2))
    finally:
        eng.shutdown()
