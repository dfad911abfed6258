"""The token path between the Ingress and LlamaModel, typed and defined once.

``GenerateRequest`` goes in; a stream of ``Delta`` ... then exactly one ``Done`` or ``ErrorEvent`` comes out (the
engine emits these same events; only a non-streamed result is gathered into one ``Done`` with its ``text``). Every other LlamaModel call answers with its
result model or an ``ErrorEvent``: errors cross Ray as values, never as wrapped tracebacks, and each transport
(HTTP JSON, SSE chunk, RunPod output) has one translator for ``ErrorEvent.error``.

The request's ``label`` is the client's id (``X-Request-Id``, RunPod job id): it names the request in logs and
responses and is never used as a key. pydantic + stdlib + our error tree only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.errors import ServeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


INT32_MAX = 2**31 - 1  # llama.cpp takes top_k and the like as C ints: a larger value would wrap silently
MAX_STOP_CHARS = 1024  # a stop string's matcher is built on the engine thread, in time linear in its length


# ---- structured output and log probabilities: the sampling constraint as data (the engine compiles it) ----


class GrammarSpec(_Strict):
    """What constrains sampling; compiled to GBNF (and cached) by serve_app/engine/gbnf.py."""

    gbnf: str | None = None            # a GBNF grammar whose start rule is "root"
    json_schema: dict[str, Any] | None = None  # or a JSON schema ({} = any JSON value; {"type": "object"} = any object)
    lead: str = ""                     # literal text once, before the first block (e.g. "</think>\n\n")
    prefix: str = ""                   # literal text the output starts with, before the JSON (e.g. "<tool_call>\n")
    suffix: str = ""                   # literal text after it
    repeat: bool = False               # one or more prefix-JSON-suffix blocks, whitespace between (parallel calls)
    triggers: tuple[str, ...] = ()     # lazy: free text until one of these appears, then the grammar applies
                                       # from that text on (so lead + prefix starts with the trigger text)

    @property
    def start(self) -> str:
        """The literal text the constrained output begins with."""
        return self.lead + self.prefix

    @model_validator(mode="after")
    def _one_grammar(self) -> GrammarSpec:
        if (self.gbnf is None) == (self.json_schema is None):
            raise ValueError("give exactly one of 'gbnf' or 'json_schema'")
        if any(not t for t in self.triggers):
            raise ValueError("trigger texts must be non-empty")
        return self


@dataclass(slots=True)
class TokenLogprob:
    """One token's log probability (natural log, the model's own distribution) and, in ``top``, the most likely
    tokens at that position (their own ``top`` empty). ``bytes`` are the token's UTF-8 bytes (a token may hold
    part of a character)."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


class SamplingParams(_Strict):
    """Per-request generation settings, as the engine understands them."""

    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=INT32_MAX)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = ()
    ignore_eos: bool = False
    # Prompt caching: False makes this request prefill its whole prompt (llama-server's field of the same name).
    cache_prompt: bool = True
    # structured output and log probabilities
    grammar: GrammarSpec | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)  # None: off; n: the sampled token's + the n most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# ---- tools and reasoning: function tools, calls in the history, how thinking is reported -------------------


class ToolFunction(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: ToolFunction


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedToolChoice(_Strict):
    name: str  # the one function the model must call


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice
ReasoningFormat = Literal["none", "deepseek", "auto"]


class Message(_Strict):
    """One chat message as the template sees it (content already flattened to text)."""

    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call answered
    name: str | None = None


class GenerateRequest(_Strict):
    """One generation: chat ``messages`` (rendered with the model's template) or a raw ``prompt``."""

    label: str = Field(description="The client's request id: for logs and responses only, never a key.")
    messages: tuple[Message, ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = True
    # tools and reasoning (chat only): offered functions, the choice, and how thinking is reported
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    reasoning_format: ReasoningFormat | None = None  # None: the server's default
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra template variables

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        return self


class TokenizeCall(_Strict):
    text: str | None = None
    messages: tuple[Message, ...] | None = None
    add_special: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeCall:
        if (self.messages is None) == (self.text is None):
            raise ValueError("give exactly one of 'text' or 'messages'")
        return self


class Tokens(_Strict):
    tokens: tuple[int, ...]


class DetokenizeCall(_Strict):
    tokens: tuple[int, ...]


class Text(_Strict):
    content: str


# ---- results --------------------------------------------------------------------------------------------------


class Timings(BaseModel):
    """Per-request timings, in the spirit of llama-server's ``timings``."""

    # Routing across replicas: which LlamaModel replica served the request (Ray Serve's replica id; "" outside
    # Ray), so a client or test can see a conversation stay on one replica.
    replica: str = ""
    queue_ms: float = 0.0
    prompt_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prompt_n: int = 0
    predicted_n: int = 0
    # Prompt caching: prompt tokens reused from the KV cache (llama-server's name).
    cache_n: int = 0


def openai_usage(u: Usage) -> dict[str, Any]:
    """``Usage`` as OpenAI spells it: the reused prompt tokens under ``prompt_tokens_details.cached_tokens``."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Prompt caching: prompt tokens reused from a cache, not computed (OpenAI: prompt_tokens_details.cached_tokens).
    cached_tokens: int = 0


FinishReason = Literal["stop", "length", "tool_calls"]

# Events are plain dataclasses, not pydantic models: the engine makes one per token per sequence on its hot path.


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of a tool call: the first for an index carries ``id`` and ``name``; later ones arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(slots=True)
class Delta:
    text: str
    n_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them
    # tools and reasoning: the thinking text, and tool-call pieces, parsed out of the model's text
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None


@dataclass(slots=True)
class Done:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    text: str | None = None  # the whole text, on non-streamed results only
    logprobs: list[TokenLogprob] | None = None  # every token's, on non-streamed results that asked for them
    # tools and reasoning, on non-streamed results only: the parsed calls and the thinking text
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None


@dataclass(slots=True)
class ErrorEvent:
    error: ServeError  # pickles with its type, message and param (``ServeError.__reduce__``)


Event = Delta | Done | ErrorEvent

ModelState = Literal["loading", "ready", "failed"]


class ModelInfo(BaseModel):
    """LlamaModel's state and load: ``/ready`` shows ``state`` and ``reason``; ``/stats`` all but ``detail``."""

    state: ModelState
    model: str
    reason: str | None = Field(default=None, description="Why the model is not ready: short, no paths.")
    detail: str | None = Field(default=None, description="The full failure, for operators (the RunPod worker's "
                               "start-up line, logs); never sent over HTTP.")
    phases: dict[str, float] = Field(default_factory=dict)
    n_ctx_seq: int | None = None
    slots_total: int = 0
    slots_busy: int = 0
    waiting: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    tokens_generated: int = 0
    tokens_prompt: int = 0
    preemptions: int = 0
    # Prompt caching: KV cells idle slots keep for reuse, prompt tokens reused so far, and per slot (busy, cached
    # tokens, seconds idle).
    kv_cells_cached: int = 0
    tokens_cached: int = 0
    slots: list[dict[str, Any]] | None = None
    # Prompt caching beyond the slots: the host-memory cache (bytes, copies, saves, restores) and SWA checkpoints.
    prompt_cache: dict[str, int] | None = None
    plan: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    gpu_memory: dict[str, int] | None = None
    # A replica of the on-demand pool (``max_models_per_replica``): the models it holds, least recently used first.
    loaded_models: list[str] | None = None


T = TypeVar("T")


def raise_if_error(result: T | ErrorEvent) -> T:
    """The one unwrapper for a LlamaModel answer: its value, or its error raised here."""
    if isinstance(result, ErrorEvent):
        raise result.error
    return result


# ---- embeddings: the Ingress -> EmbeddingModel call and its answer -----------------------------------------------


class EmbedCall(_Strict):
    """Inputs to embed, in order: each a text or a token list."""

    inputs: tuple[str | tuple[int, ...], ...] = Field(min_length=1)


class Embeddings(BaseModel):
    """One vector per input (float32 little-endian bytes, so the Ingress can send base64 without a float round
    trip), and the tokens the inputs took."""

    vectors: list[bytes]
    prompt_tokens: int
