"""One request's generation: its tokens, sampler, text and timings, from admission to its final event.

The object outlives the KV cells it runs in: a request paused for KV room keeps its ``Generation`` and resumes by
prefilling ``tokens()`` (its prompt and the output so far), so nothing it already streamed comes again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from serve_app.errors import ContextOverflowError
from serve_app.protocol import Delta, Done, Event, FinishReason, SamplingParams, Timings, TokenLogprob, Usage

from .logprobs import token_logprob
from .text import StopMatcher, Utf8Stream

if TYPE_CHECKING:
    from .grammar import GrammarSampler
    from .llama import LlamaContextHandle, LlamaModelHandle, SamplerChain


@dataclass
class EngineRequest:
    """What a caller submits. ``label`` is the client's id, for logs only: the engine keys on ``key``, which
    ``Engine.submit`` assigns (two requests may share a label)."""

    label: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the engine thread; must be cheap and must not raise
    stream: bool = True  # False: the text arrives in one Delta just before Done (no per-token wakeups)
    flush: Callable[[], None] | None = None  # called once after each engine step that emitted for this request
    arrival: float = field(default_factory=time.perf_counter)
    key: int = -1
    grammar: GrammarSampler | None = None  # compiled from params.grammar before submit; owned by the request



def check_prompt(n_prompt: int, n_ctx_seq: int) -> None:
    if n_prompt >= n_ctx_seq:
        raise ContextOverflowError(
            f"the prompt has {n_prompt} tokens but the context per request is {n_ctx_seq} "
            f"(at least one token must be left to generate)", param="messages")
    if n_prompt == 0:
        raise ContextOverflowError("the prompt is empty", param="prompt")


class _Vocab(Protocol):
    def valid_token(self, token: int) -> bool: ...


def check_prompt_tokens(tokens: list[int], model: _Vocab, n_ctx_seq: int) -> None:
    """The prompt limits, in one place: LlamaModel checks them before it takes a slot, the engine again at submit
    (it must never hand llama.cpp a prompt that overflows a sequence or names a token outside the vocabulary)."""
    check_prompt(len(tokens), n_ctx_seq)
    if any(not model.valid_token(t) for t in tokens):
        raise ContextOverflowError("the prompt contains token ids outside the vocabulary", param="prompt")


def check_request(req: EngineRequest, model: LlamaModelHandle, n_ctx_seq: int) -> None:
    """Everything that would make a request fail once admitted, refused before it is queued (typed 4xx)."""
    check_prompt_tokens(req.prompt, model, n_ctx_seq)


class Generation:
    """The state of one admitted request. Created on the engine thread at its first admission."""

    def __init__(self, req: EngineRequest, model: LlamaModelHandle, n_ctx_seq: int) -> None:
        from .llama import SamplerChain

        p = req.params
        self.req = req
        self.model = model
        self.out_tokens: list[int] = []
        self.budget = min(p.max_tokens, n_ctx_seq - len(req.prompt))  # max new tokens, capped by the room left
        seed = p.seed if p.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        self.sampler: SamplerChain | None = None if (p.greedy and not p.penalised) else SamplerChain(model, p, seed)
        self.grammar = req.grammar
        self.n_logprobs = p.logprobs
        self.logprobs: list[TokenLogprob] = []  # kept only when not streaming
        self._lp: TokenLogprob | None = None  # the last picked token's, until ``accept``
        # Logprobs wait with their token's text: sent once some of it is (a stop string may hold it back, and then
        # cut it), so the logprobs always describe the returned text. (where the token's text starts, its logprob)
        self._lp_held: deque[tuple[int, TokenLogprob]] = deque()
        self._raw_chars = 0  # characters of output before stop strings are applied
        self._sent_chars = 0  # characters of output sent (or kept, when not streaming)
        self.utf8 = Utf8Stream()
        self.stops = StopMatcher(p.stop)
        self.text: list[str] = []  # the output so far, kept only when not streaming
        self.stopped_on_string = False
        self.t_admit = time.perf_counter()
        self.t_first = 0.0
        self.n_cached = 0  # prompt tokens reused from a slot's cache at admission

    @property
    def generated(self) -> int:
        return len(self.out_tokens)

    def tokens(self) -> np.ndarray:
        """What to prefill: the prompt, plus the output so far when resuming after a pause."""
        return np.asarray(self.req.prompt + self.out_tokens, dtype=np.int32)

    def pick(self, ctx: LlamaContextHandle, i_batch: int, greedy: int) -> int:
        """The next token (``greedy``: the row's argmax, already computed for plain greedy rows); -1 when the
        grammar allows no token. Plain requests take the first line only."""
        if self.grammar is None and self.n_logprobs is None:
            return self.sampler.sample(ctx, i_batch) if self.sampler is not None else greedy
        row = ctx.row_logits(i_batch, self.model.n_vocab)
        if self.grammar is not None:
            tok = self.grammar.choose(row, self.sampler, greedy)
        else:
            tok = self.sampler.sample(ctx, i_batch) if self.sampler is not None else greedy
        if self.n_logprobs is not None and tok >= 0:
            self._lp = token_logprob(row, tok, self.n_logprobs, self.model.piece)
        return tok

    def accept(self, tok: int, now: float) -> tuple[Delta | None, FinishReason | None]:
        """Take one sampled token: the text to stream (if any) and the finish reason once it is over."""
        if not self.t_first:
            self.t_first = now
        # With a grammar, end-of-generation is only ever picked where the grammar is complete: it ends the output.
        if self.model.is_eog(tok) and (not self.req.params.ignore_eos or self.grammar is not None):
            return None, "stop"
        if self.grammar is not None:
            self.grammar.accept(tok)
        lp, self._lp = self._lp, None
        self.out_tokens.append(tok)
        raw = self.utf8.push(self.model.piece(tok))
        lps = None
        if self.n_logprobs is not None:  # the bookkeeping only for requests that asked for logprobs
            if lp is not None:
                self._lp_held.append((self._raw_chars, lp))
            self._raw_chars += len(raw)
        text, stopped = self.stops.push(raw)
        if self.n_logprobs is not None:
            lps = self._release(text, stopped)
        delta = None
        if not self.req.stream:
            self.text.append(text)
            self.logprobs.extend(lps or ())
        elif text or not stopped or lps:
            delta = Delta(text, 1, lps)
        if stopped:
            self.stopped_on_string = True
            return delta, "stop"
        return delta, "length" if self.generated >= self.budget else None

    def _release(self, text: str, stopped: bool) -> list[TokenLogprob] | None:
        """The held logprobs whose token's text has begun to be sent, now that ``text`` is; after a stop string,
        those of the tokens it cut are dropped."""
        self._sent_chars += len(text)
        out: list[TokenLogprob] = []
        while self._lp_held and self._lp_held[0][0] < self._sent_chars:
            out.append(self._lp_held.popleft()[1])
        if stopped:
            self._lp_held.clear()
        return out or None

    def final_events(self, reason: FinishReason) -> list[Event]:
        """The held-back text (unless a stop string ended it), the whole text when not streaming, and Done."""
        out: list[Event] = []
        if not self.stopped_on_string:
            tail, _ = self.stops.push(self.utf8.flush())
            tail += self.stops.flush()
            lps = [lp for _, lp in self._lp_held] or None  # everything is sent now, empty tokens included
            self._lp_held.clear()
            if (tail or lps) and self.req.stream:
                out.append(Delta(tail, 0, lps))
            elif tail or lps:
                self.text.append(tail)
                self.logprobs.extend(lps or ())
        if not self.req.stream:
            out.append(Delta("".join(self.text), self.generated,
                             self.logprobs if self.n_logprobs is not None else None))
        out.append(Done(reason, self._usage(), self._timings()))
        return out

    def _usage(self) -> Usage:
        n_prompt = len(self.req.prompt)
        return Usage(prompt_tokens=n_prompt, completion_tokens=self.generated, total_tokens=n_prompt + self.generated,
                     cached_tokens=self.n_cached)

    def _timings(self) -> Timings:
        end = time.perf_counter()
        first = self.t_first or end
        decode_s = end - first
        n = self.generated
        return Timings(
            queue_ms=(self.t_admit - self.req.arrival) * 1e3, prompt_ms=(first - self.t_admit) * 1e3,
            ttft_ms=(first - self.req.arrival) * 1e3, decode_ms=decode_s * 1e3,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            prompt_n=len(self.req.prompt), predicted_n=n, cache_n=self.n_cached,
        )

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.grammar is not None:
            self.grammar.close()
            self.grammar = None
