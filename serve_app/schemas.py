"""Wire models: the OpenAI requests, each converting itself to our ``SamplingParams``, and the small response
helpers. pydantic, stdlib and ``serve_app.protocol`` only.

Requests are tolerant: unknown OpenAI fields are accepted and reported through ``unknown_fields`` so the ingress
can log them.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.protocol import INT32_MAX, MAX_STOP_CHARS, GrammarSpec, SamplingParams

# ---- OpenAI requests --------------------------------------------------------------------------------------------


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


# ---- tools and reasoning: function tools, calls in the history -------------------------------------------------

_TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
# What the server itself gives a chat template: chat_template_kwargs may not replace these.
TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                "raise_exception", "range", "strftime_now"})


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # The arguments are always a JSON object: a schema for anything else cannot describe them.
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type 'object'")
        return v


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class NamedToolChoiceIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call answered

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


Stop = str | list[str] | None


# ---- structured output and log probabilities (OpenAI's response_format, llama-server's grammar / json_schema) ----

MAX_TOP_LOGPROBS = 20


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # always enforced: a grammar never lets the output leave the schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server: json_object + schema

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with the 'schema'")
        return self


class _Constrained(BaseModel):
    """The request fields that constrain the output, and their one ``GrammarSpec``."""

    response_format: ResponseFormat | None = None
    grammar: str | None = Field(default=None, min_length=1)
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> _Constrained:
        given = [k for k in ("grammar", "json_schema") if getattr(self, k) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give only one of {', '.join(given)}")
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        rf = self.response_format
        if self.grammar is not None:
            return GrammarSpec(gbnf=self.grammar)
        if self.json_schema is not None:
            return GrammarSpec(json_schema=self.json_schema)
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_schema":
            assert rf.json_schema is not None
            return GrammarSpec(json_schema=rf.json_schema.schema_)
        return GrammarSpec(json_schema=rf.schema_ if rf.schema_ is not None else {"type": "object"})


class _GenerationRequest(_Constrained, _OpenAIModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Stop = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    cache_prompt: bool = True  # llama-server's field: False prefills the whole prompt, reusing no cached prefix
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Stop) -> Stop:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences may be at most {MAX_STOP_CHARS} characters")
        return v

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        given = {
            k: getattr(self, k)
            for k in (
                "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                "presence_penalty", "frequency_penalty", "seed",
            )
            if getattr(self, k) is not None
        }
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return SamplingParams(max_tokens=max_tokens, stop=tuple(stops), ignore_eos=self.ignore_eos,
                              cache_prompt=self.cache_prompt, grammar=self.grammar_spec(),
                              logprobs=self.logprobs_n(), **given)

    def logprobs_n(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # tools and reasoning
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoiceIn | None = None
    parallel_tool_calls: bool = True
    reasoning_format: Literal["none", "deepseek", "auto"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}, as llama-server/vLLM

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(v or ()) & TEMPLATE_VARIABLES)
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set by a request")
        return v

    @model_validator(mode="after")
    def _tool_choice(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs at least one tool in 'tools'")
        if isinstance(choice, NamedToolChoiceIn) and choice.function.name not in names:
            raise ValueError(f"tool_choice: function '{choice.function.name}' is not in 'tools'")
        return self

    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_n(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("only one prompt per request is supported (n=1 batching happens server-side)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TokenizeRequest(_OpenAIModel):
    content: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if sum(x is not None for x in (self.content, self.prompt, self.messages)) != 1:
            raise ValueError("give exactly one of 'content', 'prompt' or 'messages'")
        return self


class DetokenizeRequest(_OpenAIModel):
    tokens: list[int]


# ---- OpenAI responses -------------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def model_card(model_id: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": now(), "owned_by": "gguf-serve"}
    if meta:
        card["meta"] = meta
    return card


# ---- embeddings (OpenAI /v1/embeddings) -------------------------------------------------------------------------

MAX_EMBED_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingRequest(_OpenAIModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be empty")
            if len(v) > MAX_EMBED_INPUTS and not isinstance(v[0], int):
                raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
            if any(isinstance(x, list) and not x for x in v):
                raise ValueError("a token list must not be empty")
        return v

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        """Each input as a text or a token tuple (one token list is one input, as in OpenAI)."""
        v = self.input
        if isinstance(v, str):
            return (v,)
        if v and isinstance(v[0], int):
            return (tuple(v),)  # type: ignore[arg-type]
        return tuple(tuple(x) if isinstance(x, list) else x for x in v)  # type: ignore[misc]
