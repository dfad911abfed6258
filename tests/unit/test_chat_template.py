"""GGUF chat templates are untrusted: they render in a sandbox, cannot reach Python internals, and template errors
become client errors, never crashes."""

from __future__ import annotations

import pytest

from serve_app.errors import InvalidRequestError
from serve_app.model.chat_template import FALLBACK_TEMPLATE, ChatTemplate
from tests.support.gguf_factory import CHATML_TEMPLATE

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_chatml_with_bos_and_generation_prompt() -> None:
    out = ChatTemplate(CHATML_TEMPLATE, "<s>", "</s>").render(MSGS)
    assert out == "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_fallback_when_gguf_has_none() -> None:
    t = ChatTemplate(None, "<s>", "</s>")
    assert t.is_fallback and t.source == FALLBACK_TEMPLATE
    assert t.render(MSGS).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("evil", [
    # CVE-2024-34359 style payloads: reach os through Python object internals.
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self.__init__.__globals__['os'].system('touch /tmp/pwned-by-template') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_malicious_template_is_blocked(evil: str, tmp_path) -> None:
    t = ChatTemplate(evil, "<s>", "</s>")
    with pytest.raises(InvalidRequestError):
        t.render(MSGS)


def test_raise_exception_is_a_client_error() -> None:
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}", "", "")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        t.render(MSGS)


def test_broken_template_is_reported() -> None:
    with pytest.raises(InvalidRequestError):
        ChatTemplate("{% for %}", "", "")
