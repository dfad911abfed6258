"""Chat prompts from a GGUF's ``tokenizer.chat_template``, rendered in a sandbox.

A GGUF is untrusted input: llama-cpp-python's CVE-2024-34359 was remote code execution through exactly this
template. We render with Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to internals, no
mutation of passed objects) and bound the output size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from serve_app.errors import InvalidRequestError

# Used when the GGUF has no template and the config gives none: ChatML is what most GGUF chat models speak.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_RENDERED_CHARS = 4 * 1024 * 1024


def _raise_exception(message: str) -> None:
    # Templates call raise_exception() to reject conversations (e.g. roles out of order): that is a client error.
    raise InvalidRequestError(f"chat template rejected the conversation: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str, eos_token: str) -> None:
        self.source = source or FALLBACK_TEMPLATE
        self.is_fallback = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        env.globals["raise_exception"] = _raise_exception
        env.filters.setdefault("tojson", _tojson)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise InvalidRequestError(f"the chat template does not compile: {e}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            out = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except InvalidRequestError:
            raise
        except SecurityError:
            raise InvalidRequestError("the model's chat template tried an unsafe operation; it was blocked") from None
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise InvalidRequestError(f"the chat template failed on this conversation: {e}",
                                      param="messages") from None
        if len(out) > MAX_RENDERED_CHARS:
            raise InvalidRequestError("the rendered chat prompt is too large", param="messages")
        return out


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)
