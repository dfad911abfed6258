"""Chat prompts from a GGUF's ``tokenizer.chat_template`` (or ``server.chat_template``), rendered in a sandbox.

A template is untrusted input: llama-cpp-python's CVE-2024-34359 was remote code execution through exactly this
template. We compile and render it in ``BoundedSandbox`` (no Python internals, no mutation, bounded sizes) under
a deadline, so a hostile template costs one request a 400 and never the replica its memory or its event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from serve_app.errors import InvalidRequestError, exception_line

from .sandbox import MAX_CHARS, BoundedSandbox, RenderTimeout, deadline

log = logging.getLogger("ray.serve")

# Used when the GGUF has no template and the config gives none: ChatML is what most GGUF chat models speak.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turn format (what llama.cpp picks for a Gemma GGUF without a template): no system role, the model's
# turns are "model", and a system message is prefixed to the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set first = messages[0] if messages else none %}"
    "{% set sys = first['content'] + '\n\n' if first and first['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Fallback templates by ``general.architecture``, with the text that ends the model's turn: it is added to the
# request's stop strings, so generation ends there even when the marker is not a special token of the vocabulary.
_FALLBACKS: dict[str, tuple[str, str]] = {"gemma": (GEMMA_TEMPLATE, "<end_of_turn>")}
_CHATML = (FALLBACK_TEMPLATE, "<|im_end|>")

MAX_SOURCE_CHARS = 256 * 1024
COMPILE_TIMEOUT_S = 5.0
RENDER_TIMEOUT_S = 2.0


def fallback_for(arch: str | None) -> tuple[str, str]:
    """(template, end-of-turn text) for a model without a usable template, by architecture family."""
    family = (arch or "").lower()
    return next((v for k, v in _FALLBACKS.items() if family.startswith(k)), _CHATML)


def _raise_exception(message: str) -> None:
    # Templates call raise_exception() to reject conversations (e.g. roles out of order): that is a client error.
    raise InvalidRequestError(f"chat template rejected the conversation: {message}", param="messages")


class ChatTemplate:
    """One compiled template. ``origin`` names it in errors ("the GGUF's chat template", "server.chat_template")."""

    def __init__(self, source: str | None, bos_token: str, eos_token: str, *, origin: str = "the chat template",
                 arch: str | None = None) -> None:
        self.is_fallback = source is None
        fallback, end = fallback_for(arch)
        self.source = fallback if source is None else source
        self.origin = "the fallback chat template" if source is None else origin
        self.stop = (end,) if source is None else ()
        self.bos_token = bos_token
        self.eos_token = eos_token
        if len(self.source) > MAX_SOURCE_CHARS:
            raise InvalidRequestError(f"{self.origin} is over {MAX_SOURCE_CHARS} characters")
        env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_exception
        try:
            with deadline(COMPILE_TIMEOUT_S):
                self._template = env.from_string(self.source)
        except Exception as e:  # any failure of untrusted input to compile, RecursionError included
            raise InvalidRequestError(f"{self.origin} does not compile: {exception_line(e)}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, variables: dict[str, Any] | None = None) -> str:
        """The prompt text. Blocking and bounded in time: call it from a worker thread, not an event loop.
        ``tools`` (OpenAI's function tools) is given to the template only when there are some: templates test
        ``tools is defined`` / ``tools is not none`` to switch their tool prompt on. ``variables``: more
        template variables (``enable_thinking``...); they never replace the ones above."""
        parts: list[str] = []
        size = 0
        extra: dict[str, Any] = {**(variables or {}), **({"tools": tools} if tools else {})}
        try:
            with deadline(RENDER_TIMEOUT_S):
                for piece in self._template.generate(
                        messages=list(messages), add_generation_prompt=add_generation_prompt,
                        bos_token=self.bos_token, eos_token=self.eos_token, **extra):
                    size += len(piece)
                    if size > MAX_CHARS:
                        raise InvalidRequestError(f"the prompt rendered by {self.origin} is too large",
                                                  param="messages")
                    parts.append(piece)
        except InvalidRequestError:
            raise
        except RenderTimeout:
            raise InvalidRequestError(f"{self.origin} took too long on this conversation", param="messages") from None
        except Exception as e:  # Security/Template/Type/Overflow/Recursion/Memory errors alike: the template's fault
            log.warning("%s failed to render: %s: %s", self.origin, type(e).__name__, e)
            raise InvalidRequestError(f"{self.origin} failed on this conversation: {exception_line(e)}",
                                      param="messages") from None
        return "".join(parts)
