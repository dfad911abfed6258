"""Inference: request -> prompt -> engine -> events; plus the state and counters LlamaModel
reports. A plain class (the deployment wraps it), so its logic is tested with a fake engine, without Ray.

The replica's event loop carries every stream, so nothing blocking runs on it: template rendering, tokenizing
and detokenizing go to a small thread pool (a flood of large ``/tokenize`` calls waits there, not in front of the
streams), and the engine runs on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from serve_app.chat.output import ChatOutput, gather_calls
from serve_app.config import AppArgs
from serve_app.engine import EngineStats, GrammarSampler, RequestStream, compile_grammar, gpu_memory
from serve_app.errors import EngineDeadError, InvalidRequestError, NotReadyError, ServeError
from serve_app.metrics import ModelMetrics
from serve_app.protocol import (
    Delta,
    DetokenizeCall,
    Done,
    ErrorEvent,
    Event,
    GenerateRequest,
    GrammarSpec,
    ModelInfo,
    Text,
    TokenizeCall,
    Tokens,
    ToolCallDelta,
)

from .loading import EngineFactory, FetchFile, Loaded, Loader, default_engine_factory

log = logging.getLogger("ray.serve")
T = TypeVar("T")
Admit = Callable[[RequestStream], Awaitable[ServeError | None]]
PROMPT_THREADS = 2
GRAMMAR_TIMEOUT_S = 5.0  # compiling a (size-bounded) schema takes milliseconds; a pathological one is refused


class ModelService:
    def __init__(self, args: AppArgs, fetch: FetchFile, use_gpu: bool,
                 engine_factory: EngineFactory = default_engine_factory, metrics: ModelMetrics | None = None,
                 gauges: bool = True) -> None:
        self.args = args
        self.model_id = args.model_name()
        self.use_gpu = use_gpu
        self.loader = Loader(args, fetch, use_gpu, engine_factory)
        self.metrics = metrics
        self.batched_admit: Admit | None = None  # set while a @serve.batch admission window is configured
        self._pool = ThreadPoolExecutor(max_workers=PROMPT_THREADS, thread_name_prefix="prompt")
        self._first_token_logged = False
        self._tasks: list[asyncio.Task[None]] = []
        self._gauges = gauges  # False: the caller reports gauges for several services together (LlamaPool)

    def start(self) -> None:
        """Begin loading (and metric reporting) on the running loop; returns at once."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._load()))
        if self.metrics is not None and self._gauges:
            self._tasks.append(loop.create_task(self._report_gauges(self.metrics)))

    async def load(self) -> None:
        """Load in the foreground: return when the model is ready, or raise why it is not (and free it)."""
        await self._load()
        if self.loader.state != "ready":
            await self.aclose()
            raise self.loader.error or ServeError("the model could not be loaded")

    async def _load(self) -> None:
        await self.loader.run()
        if self.metrics is not None:
            for k, v in self.loader.phases.items():
                self.metrics.phase.set(v, tags={"phase": k})

    def health_problem(self) -> str | None:
        return self.loader.health_problem()

    def close(self) -> None:
        self._cancel_tasks()
        self._release()

    async def aclose(self) -> None:
        """``close`` from the event loop: the blocking part (the engine thread's stop) runs on a worker thread."""
        self._cancel_tasks()
        await asyncio.to_thread(self._release)

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            try:
                task.cancel()
            except RuntimeError:  # the loop is already closed: nothing left to cancel
                pass

    def _release(self) -> None:
        # Pool threads tokenize with the model's vocabulary: let the running ones finish before it is freed.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.loader.close()

    # ---- the handle API --------------------------------------------------------------------------------------

    async def info(self) -> ModelInfo:
        ld = self.loader
        ld.check_engine()
        info = ModelInfo(state=ld.state, model=self.model_id, reason=ld.reason, detail=ld.detail, phases=ld.phases,
                         file=ld.file.model_dump() if ld.file else None,
                         gpu_memory=await asyncio.to_thread(gpu_memory) if self.use_gpu else None)
        if ld.loaded is not None:
            st = ld.loaded.engine.stats()
            info = info.model_copy(update=dict(
                n_ctx_seq=ld.loaded.engine.n_ctx_seq, slots_total=st.slots_total, slots_busy=st.slots_busy,
                waiting=st.waiting, kv_cells_used=st.kv_cells_used, kv_cells_total=st.kv_cells_total,
                tokens_generated=st.tokens_generated, tokens_prompt=st.tokens_prompt, preemptions=st.preemptions,
                kv_cells_cached=st.kv_cells_cached, tokens_cached=st.tokens_cached, slots=st.slots,
                prompt_cache=st.prompt_cache,
                plan=ld.loaded.report.plan))
        return info

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        """The events of one request: ``Delta`` ... then ``Done`` or ``ErrorEvent`` (errors are values: they
        cross Ray without traceback wrapping). With ``req.stream`` False the text comes as one ``Delta``."""
        try:
            stream, output = await self._start(req)
        except ServeError as e:
            yield ErrorEvent(e)
            return
        try:
            async for ev in stream.events():
                if isinstance(ev, Done):
                    self._observe(ev)
                if output is None:
                    yield ev
                    continue
                # Chat output with tools or thinking: the text split into content, reasoning and tool calls.
                if isinstance(ev, Delta):
                    yield output.delta(ev)
                    continue
                if isinstance(ev, Done):
                    last = output.final()
                    if last is not None:
                        yield last
                    ev = output.done(ev)
                yield ev
        finally:
            stream.close()

    async def complete(self, req: GenerateRequest) -> Done | ErrorEvent:
        """Non-streaming: ``Done`` with the whole ``text`` (and the reasoning and tool calls), or ``ErrorEvent``."""
        parts: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCallDelta] = []
        lps = None
        async for ev in self.generate(req.model_copy(update={"stream": False})):
            if isinstance(ev, Delta):
                parts.append(ev.text)
                thoughts.append(ev.reasoning)
                calls.extend(ev.tool_calls or ())
                if ev.logprobs is not None:
                    lps = [*(lps or []), *ev.logprobs]
            elif isinstance(ev, Done):
                ev.text = "".join(parts)
                ev.reasoning = "".join(thoughts) or None
                ev.tool_calls = gather_calls(calls) or None
                ev.logprobs = lps
                return ev
            else:
                return ev
        return ErrorEvent(ServeError("generation ended without a result"))

    async def tokenize(self, call: TokenizeCall) -> Tokens | ErrorEvent:
        try:
            p = self._ready().prompts
            if call.messages is not None:
                tokens = await self._off_loop(p.chat_tokens, call.messages)
            else:
                tokens = await self._off_loop(p.text_tokens, call.text or "", call.add_special)
            return Tokens(tokens=tuple(tokens))
        except ServeError as e:
            return ErrorEvent(e)

    async def detokenize(self, call: DetokenizeCall) -> Text | ErrorEvent:
        try:
            return Text(content=await self._off_loop(self._ready().prompts.detokenize, call.tokens))
        except ServeError as e:
            return ErrorEvent(e)

    # ---- internals -----------------------------------------------------------------------------------------

    def _ready(self) -> Loaded:
        loaded = self.loader.loaded
        if loaded is not None and loaded.engine.dead:
            self.loader.check_engine()
            raise EngineDeadError("the engine stopped; retry shortly")
        if self.loader.state != "ready" or loaded is None:
            raise NotReadyError(f"the model is {self.loader.state}; retry shortly")
        return self.loader.loaded

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _start(self, req: GenerateRequest) -> tuple[RequestStream, ChatOutput | None]:
        loaded = self._ready()
        prep = await self._off_loop(loaded.prompts.prepare, req)
        spec = prep.params.grammar
        grammar = await self._grammar(spec, loaded) if spec is not None else None
        rs = RequestStream(req.label, prep.tokens, prep.params, stream=req.stream, grammar=grammar)
        try:
            if self.batched_admit is not None:
                err = await self.batched_admit(rs)
                if err is not None:
                    raise err
            else:
                loaded.engine.submit([rs.request])
        except BaseException:
            # The caller went away (cancelled) or admission failed: the batch may have submitted the request
            # already, so cancel it rather than leave its slot busy until max_tokens (a key never given is a no-op).
            rs.close()
            rs.bind(loaded.engine)
            raise
        rs.bind(loaded.engine)
        return rs, prep.output

    async def _grammar(self, spec: GrammarSpec, loaded: Loaded) -> GrammarSampler:
        """The request's grammar (response_format, or the tool calls' the prompt builder made), compiled (or found
        in the cache) and validated on a worker thread, before any slot is taken: a bad one is a 400 here."""
        try:
            grammar: GrammarSampler = await asyncio.wait_for(self._off_loop(compile_grammar, spec, loaded.model),
                                                             GRAMMAR_TIMEOUT_S)
        except TimeoutError:
            raise InvalidRequestError(f"the grammar did not compile within {GRAMMAR_TIMEOUT_S:.0f} s; send a "
                                      f"simpler schema", param="response_format") from None
        return grammar

    def submit_together(self, streams: list[RequestStream]) -> list[ServeError | None]:
        """Admit ``streams`` in one engine command (their prompts then prefill in one step); when they do not all
        all go in, each one on its own, so one full queue or one bad request does not fail the rest. One result
        per stream."""
        engine = self._ready().engine
        try:
            engine.submit([s.request for s in streams])
            return [None] * len(streams)
        except EngineDeadError as e:
            return [e] * len(streams)
        except ServeError:
            # One request's problem (a full queue, a bad prompt) must not fail the others: each on its own.
            out: list[ServeError | None] = []
            for s in streams:
                try:
                    engine.submit([s.request])
                    out.append(None)
                except ServeError as e:
                    out.append(e)
            return out

    def _observe(self, done: Done) -> None:
        if self.metrics is not None:
            self.metrics.observe_finish(done)
        if not self._first_token_logged and done.usage.completion_tokens:
            # Cold start ends with the first token served, not with the weights loaded.
            self._first_token_logged = True
            first = self.loader.phases["first_token_s"] = time.perf_counter() - self.loader.t0
            if self.metrics is not None:
                self.metrics.phase.set(first, tags={"phase": "first_token_s"})
            log.info("first token served %.2f s after the model began loading", first)

    async def _report_gauges(self, m: ModelMetrics) -> None:
        while True:
            try:
                loaded = self.loader.loaded
                await report_gauges(m, [loaded.engine.stats()] if loaded is not None else [], self.use_gpu)
            except Exception:  # metrics must never take the replica down
                log.debug("gauge update failed", exc_info=True)
            await asyncio.sleep(1.0)

    def engine_stats(self) -> EngineStats | None:
        loaded = self.loader.loaded
        return loaded.engine.stats() if loaded is not None else None


def stamp_replica(ev: T, replica: str) -> T:
    """The final event names the replica that served it (``Timings.replica``): prefix affinity and pool routing
    are observable from outside."""
    if isinstance(ev, Done):
        ev.timings.replica = replica
    return ev


async def report_gauges(m: ModelMetrics, stats: list[EngineStats], use_gpu: bool) -> None:
    """A replica's slot, queue and KV gauges, summed over its engines (one, or each model a pool replica holds);
    nothing while none is loaded."""
    if stats:
        busy, total = sum(s.slots_busy for s in stats), sum(s.slots_total for s in stats)
        used, cells = sum(s.kv_cells_used for s in stats), sum(s.kv_cells_total for s in stats)
        m.queue_depth.set(sum(s.waiting for s in stats))
        m.slots_busy.set(busy)
        m.slots_free.set(total - busy)
        m.kv_used.set(used)
        m.kv_ratio.set(used / max(1, cells))
    if use_gpu:
        mem = await asyncio.to_thread(gpu_memory)
        if mem:
            m.gpu_used.set(mem["used_bytes"])
            m.gpu_total.set(mem["total_bytes"])
