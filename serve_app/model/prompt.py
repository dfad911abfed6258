"""Prompt building for one loaded model: chat template, tokenization, and the prompt limits, in one place.

Everything here is blocking (template rendering, llama.cpp tokenization, detokenization of long id lists): the
service runs it on worker threads, never on the replica's event loop.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Protocol

from serve_app.chat.formats import detect
from serve_app.chat.output import ChatOutput
from serve_app.chat.plan import plan_chat, template_message
from serve_app.engine.generation import check_prompt_tokens
from serve_app.errors import InvalidRequestError
from serve_app.protocol import GenerateRequest, Message, ReasoningFormat, SamplingParams

from .chat_template import ChatTemplate

log = logging.getLogger("ray.serve")


class Vocabulary(Protocol):
    """What prompt building needs from a loaded model (``serve_app.engine.LlamaModelHandle`` provides it)."""

    bos: int
    eos: int
    add_bos: bool

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...
    def detokenize(self, tokens: list[int], special: bool = False) -> str: ...
    def token_text(self, token: int) -> str: ...
    def valid_token(self, token: int) -> bool: ...
    def chat_template(self) -> str | None: ...
    def meta(self, key: str) -> str | None: ...


def load_template(model: Vocabulary, configured: str | None) -> ChatTemplate:
    """The configured template, else the GGUF's, else a fallback that fits the architecture. A template that
    does not compile is logged and replaced by the fallback: the model still serves."""
    bos, eos = model.token_text(model.bos), model.token_text(model.eos)
    arch = model.meta("general.architecture")
    source, origin = (configured, "server.chat_template") if configured else (
        model.chat_template(), "the GGUF's chat template")
    try:
        return ChatTemplate(source, bos, eos, origin=origin, arch=arch)
    except InvalidRequestError as e:
        log.warning("%s; using the fallback chat template", e.message)
        return ChatTemplate(None, bos, eos, arch=arch)


@dataclass
class Prepared:
    """A generation ready for the engine: its prompt, its params (grammar included), and the parsers for its
    output (None: plain text)."""

    tokens: list[int]
    params: SamplingParams
    output: ChatOutput | None = None


class PromptBuilder:
    def __init__(self, model: Vocabulary, template: ChatTemplate, n_ctx_seq: int,
                 reasoning_format: ReasoningFormat = "auto") -> None:
        self.model = model
        self.template = template
        self.n_ctx_seq = n_ctx_seq
        self.format = detect(template.source)  # the tool-call family and thinking, once per model
        if not self._renders_system():
            self.format = dataclasses.replace(self.format, system_role=False)
        self.reasoning_format = reasoning_format

    def _renders_system(self) -> bool:
        try:
            text = self.template.render([{"role": "system", "content": "\x01"}, {"role": "user", "content": "u"}])
            return "\x01" in text
        except InvalidRequestError:
            return False

    def chat_tokens(self, messages: tuple[Message, ...]) -> list[int]:
        text = self.template.render([template_message(m) for m in messages], add_generation_prompt=True)
        return self._tokens(text)

    def _tokens(self, text: str) -> list[int]:
        # Templates usually write the BOS text themselves; adding another would double it.
        bos_text = self.template.bos_token
        add_special = self.model.add_bos and not (bos_text and text.startswith(bos_text))
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def prepare(self, req: GenerateRequest) -> Prepared:
        """Prompt, params and output parsers of a generation, checked against the limits (raises before any
        engine work). Chats get their tools, tool grammar and reasoning split here, where the template is known."""
        if req.messages is None:
            return Prepared(self.request_tokens(req), req.params)
        plan = plan_chat(self.format, req, self.reasoning_format)
        text = self.template.render(plan.messages, add_generation_prompt=True, tools=plan.tools,
                                    variables=plan.variables)
        tokens = self._tokens(text)
        check_prompt_tokens(tokens, self.model, self.n_ctx_seq)
        params = self.sampling(req)
        grammar = plan.grammar(text)
        if grammar != params.grammar:
            params = params.model_copy(update={"grammar": grammar})
        return Prepared(tokens, params, plan.output(text))

    def text_tokens(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special, True)

    def request_tokens(self, req: GenerateRequest) -> list[int]:
        """The prompt of a generation, checked against the limits (raises before any engine work)."""
        if req.messages is not None:
            tokens = self.chat_tokens(req.messages)
        elif isinstance(req.prompt, tuple):
            tokens = list(req.prompt)
        else:
            tokens = self.model.tokenize(req.prompt or "", add_special=True, parse_special=False)
        check_prompt_tokens(tokens, self.model, self.n_ctx_seq)
        return tokens

    def sampling(self, req: GenerateRequest) -> SamplingParams:
        """The request's params, plus the fallback template's end-of-turn text as a stop string for chats."""
        extra = [s for s in self.template.stop if s not in req.params.stop] if req.messages is not None else []
        return req.params.model_copy(update={"stop": (*req.params.stop, *extra)}) if extra else req.params

    def detokenize(self, tokens: tuple[int, ...]) -> str:
        if any(not self.model.valid_token(t) for t in tokens):
            raise InvalidRequestError("token ids must be within the vocabulary", param="tokens")
        return self.model.detokenize(list(tokens), special=True)
