"""The continuous-batching scheduler: one llama context, ``n_parallel`` slots, one engine thread.

Every step puts one token of every generating sequence into one ``llama_decode`` call, plus up to
``prefill_chunk`` prompt tokens of sequences still reading their prompt (so a long prompt never stalls running
streams for long). New requests join between steps. A finished or cancelled sequence's KV stays in its slot as a
prompt cache (``prefix.py``) until a request with another prefix needs the slot or a full unified KV needs the
cells.
While the engine thread runs, every call into the llama context happens on it: other threads enqueue commands,
and read-outs such as ``kv_free`` run there too (``_call``). The context is freed only once that thread has
stopped, by whichever of it and ``shutdown`` comes last.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from serve_app.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    KVCacheFullError,
    QueueFullError,
    ServeError,
)
from serve_app.protocol import ErrorEvent, Event, FinishReason

from .batch import NpBatch
from .generation import EngineRequest, Generation, check_request
from .hostcache import HostCache
from .llama import LlamaContextHandle, LlamaModelHandle
from .prefix import PrefixCache, pick_slot
from .stats import EngineStats, slot_report
from .step import Slot, admitted, advance_positions, build_batch, greedy_tokens

log = logging.getLogger("serve_app.engine")
T = TypeVar("T")


class Engine:
    """Owns the context and the engine thread. ``submit`` / ``cancel`` / ``stats`` are thread-safe."""

    def __init__(self, model: LlamaModelHandle, ctx: LlamaContextHandle, *, prefill_chunk: int,
                 max_queued_requests: int, cache_ram_mib: int = 0) -> None:
        self.model = model
        self.ctx = ctx
        self.n_slots = ctx.n_seq_max
        self.n_ctx_seq = ctx.n_ctx_seq
        room = ctx.n_batch - self.n_slots  # the decode tokens of every slot come first in a step
        self.prefill_chunk = max(1, min(prefill_chunk, room)) if room > 0 else 1
        self.max_pending = self.n_slots + max_queued_requests
        self._slots = [Slot(seq=i) for i in range(self.n_slots)]
        self._batch = NpBatch(ctx.n_batch)
        self._prefix = PrefixCache(ctx, ctx.n_swa, HostCache(ctx, cache_ram_mib << 20) if cache_ram_mib else None)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[EngineRequest] = deque()
        self._paused: deque[Generation] = deque()  # preempted for KV room; re-admitted before anything new
        self._cancelled: set[int] = set()
        self._keys = itertools.count()
        self._pending = 0  # submitted and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._native_lock = threading.Lock()
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

    def submit(self, reqs: list[EngineRequest]) -> None:
        """Queue requests and give each its key; all of them are admitted in the same step when slots allow (their
        prompts then prefill in one batch). Raises before any work: dead engine, bad prompt, full queue."""
        for r in reqs:
            check_request(r, self.model, self.n_ctx_seq)
        with self._lock:  # the dying engine thread marks itself dead under this lock, then fails what is queued
            if self.dead:
                raise EngineDeadError(f"the engine stopped: {self.dead}")
            if self._pending + len(reqs) > self.max_pending:
                raise QueueFullError(f"all {self.n_slots} slots are busy and the queue is full; retry later")
            self._pending += len(reqs)
            for r in reqs:
                r.key = next(self._keys)
            self._inbox.put(("submit", reqs))

    def cancel(self, key: int) -> None:
        """Drop the request ``submit`` gave this key, wherever it is; a finished one is ignored."""
        self._inbox.put(("cancel", key))

    def stats(self) -> EngineStats:
        busy = [s for s in self._slots if s.busy]
        return EngineStats(
            slots_total=self.n_slots, slots_busy=len(busy), waiting=max(0, self._pending - len(busy)),
            kv_cells_used=sum(s.n_past for s in busy), kv_cells_total=self.ctx.n_ctx,
            steps=self.steps, tokens_generated=self.tokens_generated, tokens_prompt=self.tokens_prompt,
            dead=self.dead, preemptions=self.preemptions, decode_s=self.decode_s, sample_s=self.sample_s,
            busy_s=self.busy_s, kv_cells_cached=sum(len(s.cache) for s in self._slots if not s.busy),
            tokens_cached=self._prefix.reused_tokens,
            slots=slot_report(self._slots), prompt_cache=self._prefix.report(),
        )

    def kv_free(self) -> bool:
        """True when no request holds KV cells: no slot is busy, and each idle slot's sequence holds exactly the
        prompt cache it accounts for (asked of llama.cpp itself, on the engine thread), so nothing leaked."""
        return self._call(lambda: all(not s.busy and self.ctx.seq_pos_max(s.seq) == len(s.cache) - 1
                                      for s in self._slots))

    def drop_prompt_cache(self) -> None:
        """Free the KV that idle slots keep for reuse (no cell is held for them afterwards), and the host cache."""
        self._call(lambda: (self._evict_idle(save=False), self._prefix.host and self._prefix.host.clear()))

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop the engine thread (failing what is still queued) and free the context. If the thread does not stop
        within ``timeout`` (a long decode), the context stays allocated and the thread frees it when it stops:
        nothing is freed under it. Returns whether it stopped in time."""
        self._stop = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("engine thread still running %.1f s after shutdown; it frees the context when it stops",
                        timeout)
            return False
        self._free_native()
        return True

    def _call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` on the engine thread between steps and return its result (directly once it has stopped)."""
        if not self._thread.is_alive():
            with self._native_lock:
                return fn()
        fut: Future[T] = Future()
        self._inbox.put(("call", (fn, fut)))
        try:
            return fut.result(timeout)
        except TimeoutError:
            # The thread died between the liveness check and reading its inbox: say so, typed.
            raise EngineDeadError(f"the engine did not answer within {timeout:.0f} s ({self.dead or 'busy'})") from None

    def _inject_fault(self, exc: BaseException) -> None:
        """Make the engine thread raise ``exc`` at its next command, as a crash inside a step would: for tests of
        what a dead engine looks like from outside (``dead`` set, streams failed, health failing)."""
        self._inbox.put(("fault", exc))

    # ---- engine thread: the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox(block=not self._has_work())
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
        except BaseException as e:  # the engine must never die silently: fail everyone, report, let health fail
            log.exception("engine thread crashed")
            self.dead = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self.dead = self.dead or "shut down"
            self._fail_all(EngineDeadError(f"the engine stopped: {self.dead}"))
            if self._stop:
                self._free_native()

    def _has_work(self) -> bool:
        return any(s.busy for s in self._slots) or bool(self._waiting) or bool(self._paused)

    def _fail_all(self, err: ServeError) -> None:
        """Consumers must not wait forever on a dead engine: every request still known gets an error."""
        try:
            for s in self._slots:
                if s.busy:
                    self._finish_error(s, err)
            self._drain_inbox(block=False, faults=False)
            while self._paused:
                gen = self._paused.popleft()
                gen.close()
                self._fail_waiting(gen.req, err)
            while self._waiting:
                self._fail_waiting(self._waiting.popleft(), err)
            self._flush()
        except Exception:
            log.exception("failing the open requests of a stopped engine")

    def _free_native(self) -> None:
        """Free the samplers and the context once; only called when the engine thread cannot touch them again."""
        with self._native_lock:
            for s in self._slots:
                if s.gen is not None:
                    s.gen.close()
            self.ctx.close()

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

    def _drain_inbox(self, block: bool, faults: bool = True) -> None:
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
            elif kind == "call":
                fn, fut = payload
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            elif kind == "fault" and faults:
                raise payload
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    # ---- engine thread: admission and cancellation -------------------------------------------------------------

    def _apply_cancellations(self) -> None:
        if not self._cancelled:
            return
        gone = self._cancelled
        for s in self._slots:
            if s.gen is not None and s.gen.req.key in gone:
                self._release(s, keep=True)  # between steps: its KV is exactly the tokens it has read
        for gen in [g for g in self._paused if g.req.key in gone]:
            self._paused.remove(gen)
            gen.close()
            self._done_pending()
        if any(r.key in gone for r in self._waiting):
            for r in self._waiting:
                if r.key in gone:
                    self._done_pending()
            self._waiting = deque(r for r in self._waiting if r.key not in gone)
        # Keys are never reused: a cancel for a request that already finished matches nothing and is dropped.
        self._cancelled = set()

    def _admit(self) -> None:
        if self._kv_full:
            return  # a request was paused for KV room: admit nothing until a running one frees its cells
        while self._paused or self._waiting:
            free = [s for s in self._slots if not s.busy]
            if not free:
                return
            gen = self._paused.popleft() if self._paused else self._start(self._waiting.popleft())
            if gen is None:
                continue
            tokens = gen.tokens()
            s, n_match = pick_slot(free, tokens, gen.req.params.cache_prompt)
            n = self._prefix.reuse(s, tokens, n_match, gen.req.params.cache_prompt)
            s.gen = gen
            s.prompt = tokens
            s.n_prefilled = s.n_past = n
            if not gen.out_tokens:  # a resumed request reports what its first admission reused
                gen.n_cached = n

    def _start(self, req: EngineRequest) -> Generation | None:
        try:
            return Generation(req, self.model, self.n_ctx_seq)
        except Exception as e:  # e.g. llama.cpp refused the sampler chain: this request fails, the engine goes on
            log.exception("could not start request %s", req.label)
            self._fail_waiting(req, EngineError(f"could not start generation ({type(e).__name__})"))
            return None

    # ---- engine thread: one step -------------------------------------------------------------------------------

    def _step(self) -> tuple[float, float]:
        """One llama_decode over every active sequence; returns the seconds spent in it and in sampling."""
        with_logits = build_batch(self._batch, self._slots, self.prefill_chunk)
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
        self.tokens_prompt += advance_positions(self._slots)
        self._prefix.checkpoint(self._slots)
        greedy = greedy_tokens(self.ctx, self.model.n_vocab, with_logits)
        toks = [s.gen.pick(self.ctx, s.i_batch, int(greedy[j])) if s.gen else -1 for j, s in enumerate(with_logits)]
        t2 = time.perf_counter()
        for s, tok in zip(with_logits, toks, strict=True):
            if tok < 0:
                self._finish_error(s, InvalidRequestError(
                    "the grammar allows no token of this model's vocabulary at this point of the output",
                    param="response_format"))
                continue
            self._accept(s, tok, t2)
        return t1 - t0, t2 - t1

    def _accept(self, s: Slot, tok: int, now: float) -> None:
        gen = s.gen
        assert gen is not None
        before = gen.generated
        delta, reason = gen.accept(tok, now)
        self.tokens_generated += gen.generated - before
        if delta is not None:
            self._emit(gen.req, delta)
        if reason is not None:
            self._finish(s, reason)

    def _preempt_newest(self) -> None:
        """No KV room for this batch (only with a unified KV; llama.cpp restored its memory state): pause the most
        recently admitted request, its KV freed and its generation kept, so the others can go on; nothing is
        admitted until one of them finishes. A lone request cannot be helped: it fails with a retryable error."""
        busy = sorted((s for s in self._slots if s.busy), key=admitted)
        for s in busy:
            s.pending_prefill, s.pending_decode = 0, False
        if self._evict_idle():
            return  # idle prompt caches go before any running request: the same batch is retried next step
        if len(busy) <= 1:
            if busy:
                self._finish_error(busy[0], KVCacheFullError(
                    f"the KV cache ({self.ctx.n_ctx} cells) has no room for this request; retry later or send a "
                    f"shorter one"))
            return
        victim = busy[-1]
        gen = victim.gen
        assert gen is not None
        log.warning("KV cache full: pausing request %s after %d tokens (%d active)", gen.req.label, gen.generated,
                    len(busy))
        self._reset_slot(victim)  # the generation (and its sampler) now waits in _paused; its KV is freed
        self._paused.appendleft(gen)
        self._kv_full = True
        self.preemptions += 1

    # ---- engine thread: endings --------------------------------------------------------------------------------

    def _finish(self, s: Slot, reason: FinishReason) -> None:
        gen = s.gen
        assert gen is not None
        events = gen.final_events(reason)
        self._release(s, keep=True)  # the slot is free before the consumer sees Done
        for ev in events:
            self._emit(gen.req, ev)

    def _finish_error(self, s: Slot, err: ServeError) -> None:
        gen = s.gen
        self._release(s)
        if gen is not None:
            self._emit(gen.req, ErrorEvent(err))

    def _fail_waiting(self, r: EngineRequest, err: ServeError) -> None:
        self._done_pending()
        self._emit(r, ErrorEvent(err))

    def _release(self, s: Slot, keep: bool = False) -> None:
        """The slot's generation leaves; ``keep``: its KV stays as a prompt cache (else, after a failed decode, it
        cannot be trusted and is freed)."""
        gen = s.gen
        if gen is not None:
            gen.close()
        if keep and gen is not None:
            PrefixCache.keep(s, gen.req.prompt + gen.out_tokens)
            s.reset()
        else:
            self._reset_slot(s)
        self._done_pending()
        self._kv_full = False  # its cells are free (or cached, and evicted first when the KV is full)

    def _reset_slot(self, s: Slot) -> None:
        self.ctx.free_seq(s.seq)
        PrefixCache.forget(s)
        s.reset()

    def _evict_idle(self, save: bool = True) -> bool:
        """Free every idle slot's prompt cache (``save``: into the host cache first); returns whether any held cells."""
        idle = [s for s in self._slots if not s.busy and len(s.cache)]
        for s in idle:
            if save:
                self._prefix.stash(s)
            self._reset_slot(s)
        return bool(idle)

    def _done_pending(self) -> None:
        with self._lock:
            self._pending -= 1
