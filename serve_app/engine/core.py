"""The continuous-batching engine: one llama context, ``n_parallel`` slots, one decode thread.

Every step puts one token of every generating sequence into one ``llama_decode`` call, plus up to
``prefill_chunk`` prompt tokens of sequences still reading their prompt (so a long prompt never stalls running
streams for long). New requests join between steps; a finished or cancelled sequence frees its KV at once.
All llama_context calls happen on the engine thread; other threads only enqueue commands.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.errors import ContextOverflowError, EngineDeadError, EngineError, QueueFullError, ServeError
from serve_app.protocol import Delta, Done, ErrorEvent, Event, FinishReason, SamplingParams, Timings, Usage

from .batch import NpBatch
from .llama import LlamaContextHandle, LlamaModelHandle, SamplerChain
from .text import StopMatcher, Utf8Stream

log = logging.getLogger("serve_app.engine")


@dataclass
class _Resume:
    """A preempted request's generation state: on re-admission its prompt and the tokens it already produced are
    prefilled again and generation goes on from there, so nothing already streamed is produced twice."""

    out_tokens: list[int]
    generated: int
    budget: int
    last_token: int
    sampler: SamplerChain | None
    utf8: Utf8Stream | None
    stops: StopMatcher | None
    text: list[str]
    t_admit: float
    t_first: float


@dataclass
class EngineRequest:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the engine thread; must be cheap and must not raise
    stream: bool = True  # False: the text arrives in one Delta just before Done (no per-token wakeups)
    flush: Callable[[], None] | None = None  # called once after each engine step that emitted for this request
    arrival: float = field(default_factory=time.perf_counter)
    resume: _Resume | None = None  # set while a preempted request waits to be re-admitted


@dataclass
class _Slot:
    seq: int
    req: EngineRequest | None = None
    prompt: np.ndarray | None = None  # what is prefilled: the request's prompt (+ its output so far, on resume)
    n_prompt: int = 0  # the request's own prompt length, for usage
    out_tokens: list[int] = field(default_factory=list)
    n_prefilled: int = 0
    n_past: int = 0
    budget: int = 0  # max new tokens, already capped by the room left in the slot
    generated: int = 0
    last_token: int = -1
    i_batch: int = -1
    pending_prefill: int = 0
    pending_decode: bool = False
    sampler: SamplerChain | None = None
    utf8: Utf8Stream | None = None
    stops: StopMatcher | None = None
    text: list[str] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0

    @property
    def busy(self) -> bool:
        return self.req is not None

    @property
    def generating(self) -> bool:
        return self.req is not None and self.prompt is not None and self.n_prefilled >= len(self.prompt)


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


class Engine:
    """Owns the context and the decode thread. ``submit`` / ``cancel`` are thread-safe."""

    def __init__(self, model: LlamaModelHandle, ctx: LlamaContextHandle, *, prefill_chunk: int, max_queue: int) -> None:
        self.model = model
        self.ctx = ctx
        self.n_slots = ctx.n_seq_max
        self.n_ctx_seq = ctx.n_ctx_seq
        self.prefill_chunk = max(1, min(prefill_chunk, ctx.n_batch - self.n_slots)) if ctx.n_batch > self.n_slots \
            else 1
        self.max_pending = self.n_slots + max_queue
        self._slots = [_Slot(seq=i) for i in range(self.n_slots)]
        self._batch = NpBatch(ctx.n_batch)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[EngineRequest] = deque()
        self._cancelled: set[str] = set()
        self._pending = 0  # submitted and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._stop = False
        self._flushes: dict[int, Callable[[], None]] = {}
        self.dead: str | None = None
        self.steps = 0
        self.tokens_generated = 0
        self.tokens_prompt = 0
        self.preemptions = 0  # requests paused because a unified KV ran out of cells
        # Where the engine thread's working time goes (seconds, cumulative): llama_decode; sampling (from the end of
        # llama_decode to the step's tokens: position bookkeeping, the vectorised argmax, sampler chains); and all
        # of it, so the rest is Python around them (admission, batch building, text and stop handling, delivery).
        self.decode_s = self.sample_s = self.busy_s = 0.0
        self._kv_full = False
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()

    # ---- public, any thread ------------------------------------------------------------------------------------

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens but the context per request is {self.n_ctx_seq} "
                f"(at least one token must be left to generate)", param="messages")
        if n_prompt == 0:
            raise ContextOverflowError("the prompt is empty", param="prompt")

    def submit(self, reqs: list[EngineRequest]) -> None:
        """Queue requests; all of them are admitted in the same step when slots allow (their prompts then
        prefill in one batch). Raises before any work: dead engine, bad prompt, full queue."""
        if self.dead:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        for r in reqs:
            self.check_prompt(len(r.prompt))
            if any(not self.model.valid_token(t) for t in r.prompt):
                raise ContextOverflowError("the prompt contains token ids outside the vocabulary", param="prompt")
        with self._lock:
            if self._pending + len(reqs) > self.max_pending:
                raise QueueFullError(f"all {self.n_slots} slots are busy and the queue is full; retry later")
            self._pending += len(reqs)
        self._inbox.put(("submit", reqs))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def stats(self) -> EngineStats:
        busy = [s for s in self._slots if s.busy]
        return EngineStats(
            slots_total=self.n_slots, slots_busy=len(busy), waiting=max(0, self._pending - len(busy)),
            kv_cells_used=sum(s.n_past for s in busy), kv_cells_total=self.ctx.n_ctx,
            steps=self.steps, tokens_generated=self.tokens_generated, tokens_prompt=self.tokens_prompt,
            dead=self.dead, preemptions=self.preemptions, decode_s=self.decode_s, sample_s=self.sample_s,
            busy_s=self.busy_s,
        )

    @property
    def free_slots(self) -> int:
        return max(0, self.n_slots - self._pending)

    def kv_free(self) -> bool:
        """True when no sequence holds KV cells (checked through llama.cpp itself)."""
        return all(self.ctx.seq_pos_max(s.seq) < 0 for s in self._slots)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the decode thread (failing what is still queued) and free the context and its thread pool."""
        self._stop = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout)
        if not self._thread.is_alive():
            for s in self._slots:
                if s.sampler is not None:
                    s.sampler.close()
                    s.sampler = None
            self.ctx.close()

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox(block=not any(s.busy for s in self._slots) and not self._waiting)
                if self._stop:
                    break
                t0 = time.perf_counter()
                self._apply_cancellations()
                self._admit()
                decode_s = sample_s = 0.0
                if any(s.busy for s in self._slots):
                    decode_s, sample_s = self._step()
                self._flush()
                # Updated together, so a reader on another thread sees a consistent split.
                self.decode_s += decode_s
                self.sample_s += sample_s
                self.busy_s += time.perf_counter() - t0
        except Exception as e:  # the engine must never die silently: fail everyone, report, let health fail
            log.exception("engine thread crashed")
            self.dead = f"{type(e).__name__}: {e}"
        finally:
            reason = self.dead or "the engine was shut down"
            for s in self._slots:
                if s.busy:
                    self._finish_error(s, EngineDeadError(reason))
            while self._waiting:
                self._fail_waiting(self._waiting.popleft(), EngineDeadError(reason))
            self._drain_inbox(block=False)
            while self._waiting:
                self._fail_waiting(self._waiting.popleft(), EngineDeadError(reason))
            self._flush()  # deliver those failures: consumers must not wait forever on a dead engine
            self.dead = self.dead or "shut down"

    def _emit(self, req: EngineRequest, ev: Event) -> None:
        req.emit(ev)
        if req.flush is not None:
            self._flushes[id(req.flush)] = req.flush

    def _flush(self) -> None:
        """One wake-up per consumer (event loop) per step, however many requests it follows."""
        if self._flushes:
            flushes, self._flushes = self._flushes, {}
            for f in flushes.values():
                f()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._waiting.extend(payload)
            elif kind == "cancel":
                self._cancelled.add(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        if not self._cancelled:
            return
        for s in self._slots:
            if s.req is not None and s.req.id in self._cancelled:
                self._cancelled.discard(s.req.id)
                self._release(s)
        if self._waiting:
            keep = deque(r for r in self._waiting if r.id not in self._cancelled)
            for r in self._waiting:
                if r.id in self._cancelled:
                    self._cancelled.discard(r.id)
                    if r.resume is not None and r.resume.sampler is not None:
                        r.resume.sampler.close()
                    self._done_pending()
            self._waiting = keep
        # A cancel for a request that already finished must not linger and match nothing forever.
        self._cancelled.clear()

    def _admit(self) -> None:
        if self._kv_full:
            return  # a request was preempted for KV room: admit nothing until a running one frees its cells
        for s in self._slots:
            if not self._waiting:
                return
            if s.busy:
                continue
            r = self._waiting.popleft()
            s.req = r
            s.n_prompt = len(r.prompt)
            s.n_prefilled = s.n_past = 0
            if r.resume is not None:
                self._restore(s, r)
                continue
            s.prompt = np.asarray(r.prompt, dtype=np.int32)
            s.out_tokens = []
            s.generated = 0
            s.budget = min(r.params.max_tokens, self.n_ctx_seq - len(r.prompt))
            seed = r.params.seed if r.params.seed is not None else int.from_bytes(np.random.bytes(4), "little")
            s.sampler = None if (r.params.greedy and not r.params.penalised) else SamplerChain(self.model, r.params,
                                                                                                seed)
            s.utf8 = Utf8Stream()
            s.stops = StopMatcher(r.params.stop)
            s.t_admit = time.perf_counter()
            s.t_first = 0.0

    @staticmethod
    def _restore(s: _Slot, r: EngineRequest) -> None:
        res = r.resume
        assert res is not None
        r.resume = None
        s.prompt = np.asarray(r.prompt + res.out_tokens, dtype=np.int32)
        s.out_tokens, s.generated, s.budget, s.last_token = res.out_tokens, res.generated, res.budget, res.last_token
        s.sampler, s.utf8, s.stops, s.text = res.sampler, res.utf8, res.stops, res.text
        s.t_admit, s.t_first = res.t_admit, res.t_first

    def _build_batch(self) -> list[_Slot]:
        b = self._batch
        b.clear()
        with_logits: list[_Slot] = []
        for s in self._slots:
            if s.generating:
                s.i_batch = b.add_one(s.last_token, s.n_past, s.seq)
                s.pending_decode = True
                with_logits.append(s)
        budget = min(self.prefill_chunk, b.room)
        for s in sorted((s for s in self._slots if s.busy and not s.generating), key=lambda s: s.t_admit):
            if budget <= 0:
                break
            assert s.prompt is not None
            take = min(budget, len(s.prompt) - s.n_prefilled)
            last = s.n_prefilled + take == len(s.prompt)
            i = b.add(s.prompt[s.n_prefilled:s.n_prefilled + take], s.n_prefilled, s.seq, last)
            s.pending_prefill = take
            budget -= take
            if last:
                s.i_batch = i
                with_logits.append(s)
        return with_logits

    def _step(self) -> tuple[float, float]:
        """One llama_decode over every active sequence; returns the seconds spent in it and in sampling."""
        with_logits = self._build_batch()
        if self._batch.n == 0:
            return 0.0, 0.0
        t0 = time.perf_counter()
        rc = self.ctx.decode(self._batch.full())
        t1 = time.perf_counter()
        if rc == 1:
            self._preempt_newest()
            return t1 - t0, 0.0
        if rc != 0:
            # rc 2 is an abort, rc -1 a malformed batch (our bug), < -1 fatal: fail the active requests, keep going.
            log.error("llama_decode returned %d; failing %d active requests", rc, len(with_logits))
            for s in self._slots:
                if s.busy:
                    self._finish_error(s, EngineError(f"decode failed (llama_decode returned {rc})"))
            return t1 - t0, 0.0
        self.steps += 1
        for s in self._slots:
            if s.pending_decode:
                s.n_past += 1
                s.pending_decode = False
            if s.pending_prefill:
                s.n_prefilled += s.pending_prefill
                s.n_past += s.pending_prefill
                self.tokens_prompt += s.pending_prefill
                s.pending_prefill = 0
        greedy = self._greedy_tokens(with_logits)
        toks = [int(greedy[j]) if s.sampler is None else s.sampler.sample(self.ctx, s.i_batch)
                for j, s in enumerate(with_logits)]
        t2 = time.perf_counter()
        for s, tok in zip(with_logits, toks, strict=True):
            self._accept(s, tok)
        return t1 - t0, t2 - t1

    def _greedy_tokens(self, with_logits: list[_Slot]) -> np.ndarray:
        """Argmax of every greedy row in one vectorised call over llama.cpp's output matrix (rows are the
        logits-requesting tokens in batch order, which is ``with_logits``' order), so per-sequence host work does
        not grow with the batch: on a GPU it would otherwise rival the decode itself."""
        rows = [j for j, s in enumerate(with_logits) if s.sampler is None]
        out = np.zeros(len(with_logits), dtype=np.int64)
        if rows:
            mat = self.ctx.all_logits(len(with_logits), self.model.n_vocab)
            out[rows] = np.argmax(mat[rows], axis=1)
        return out

    def _preempt_newest(self) -> None:
        """No KV room for this batch (only with a unified KV; llama.cpp restored its memory state): put the most
        recently admitted request back in front of the queue with its KV freed and its progress kept, so the others
        can go on; nothing is admitted until one of them finishes. A lone request cannot be helped: it fails."""
        busy = sorted((s for s in self._slots if s.busy), key=lambda s: s.t_admit)
        for s in busy:
            s.pending_prefill = 0
            s.pending_decode = False
        if len(busy) <= 1:
            if busy:
                self._finish_error(busy[0], EngineError("the KV cache has no room for this request"))
            return
        victim = busy[-1]
        req = victim.req
        assert req is not None
        log.warning("KV cache full: pausing request %s after %d tokens (%d active)", req.id, victim.generated,
                    len(busy))
        req.resume = _Resume(list(victim.out_tokens), victim.generated, victim.budget, victim.last_token,
                             victim.sampler, victim.utf8, victim.stops, victim.text, victim.t_admit, victim.t_first)
        victim.sampler = None  # now owned by the resume state: resetting the slot must not free it
        self._reset_slot(victim)
        self._waiting.appendleft(req)
        self._kv_full = True
        self.preemptions += 1

    def _accept(self, s: _Slot, tok: int) -> None:
        req = s.req
        assert req is not None
        now = time.perf_counter()
        if s.generated == 0:
            s.t_first = now
        if self.model.is_eog(tok) and not req.params.ignore_eos:
            self._finish(s, "stop")
            return
        s.generated += 1
        s.last_token = tok
        s.out_tokens.append(tok)
        self.tokens_generated += 1
        assert s.utf8 is not None and s.stops is not None
        text, stopped = s.stops.push(s.utf8.push(self.model.piece(tok)))
        if not req.stream:
            s.text.append(text)
        elif text or not stopped:
            self._emit(req, Delta(text, 1))
        if stopped:
            self._finish(s, "stop", flush=False)
        elif s.generated >= s.budget:
            self._finish(s, "length")

    def _finish(self, s: _Slot, reason: FinishReason, flush: bool = True) -> None:
        req = s.req
        assert req is not None and s.prompt is not None
        if flush and s.utf8 is not None and s.stops is not None:
            tail, _ = s.stops.push(s.utf8.flush())
            tail += s.stops.flush()
            if tail and req.stream:
                self._emit(req, Delta(tail, 0))
            elif tail:
                s.text.append(tail)
        if not req.stream:
            self._emit(req, Delta("".join(s.text), s.generated))
        end = time.perf_counter()
        first = s.t_first or end
        decode_s = end - first
        n_prompt = s.n_prompt
        timings = Timings(
            queue_ms=(s.t_admit - req.arrival) * 1e3, prompt_ms=(first - s.t_admit) * 1e3,
            ttft_ms=(first - req.arrival) * 1e3, decode_ms=decode_s * 1e3,
            decode_tokens_per_s=(s.generated - 1) / decode_s if s.generated > 1 and decode_s > 0 else 0.0,
            prompt_n=n_prompt, predicted_n=s.generated,
        )
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=s.generated, total_tokens=n_prompt + s.generated)
        self._release(s)
        self._emit(req, Done(reason, usage, timings))

    def _finish_error(self, s: _Slot, err: ServeError) -> None:
        req = s.req
        self._release(s)
        if req is not None:
            self._emit(req, ErrorEvent(err))

    def _fail_waiting(self, r: EngineRequest, err: ServeError) -> None:
        self._done_pending()
        self._emit(r, ErrorEvent(err))

    def _release(self, s: _Slot) -> None:
        self._reset_slot(s)
        self._done_pending()
        self._kv_full = False  # its cells are free again

    def _reset_slot(self, s: _Slot) -> None:
        self.ctx.free_seq(s.seq)
        if s.sampler is not None:
            s.sampler.close()
        s.req = None
        s.prompt = None
        s.out_tokens = []
        s.sampler = s.utf8 = s.stops = None
        s.text = []
        s.n_prefilled = s.n_past = s.generated = s.pending_prefill = 0
        s.pending_decode = False
        s.i_batch = -1

    def _done_pending(self) -> None:
        with self._lock:
            self._pending -= 1
