"""A hostile chat template (from a GGUF or ``server.chat_template``) costs one request a 400 naming the template,
never the replica its memory, its CPU or its event loop: compiling does not fold huge constants, every way of
building a large value is refused before it allocates, a runaway loop stops at its deadline and frees its thread,
and Python errors (recursion, overflow) are client errors. ``tojson`` writes plain JSON like Hugging Face's.

Each hostile case runs in a child process under a 2 GiB address-space limit and a timeout, so a regression shows
up as a failed test rather than an exhausted machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from serve_app.errors import InvalidRequestError
from serve_app.model.chat_template import ChatTemplate

MSGS = [{"role": "user", "content": "hi"}]
LIMIT_BYTES = 2 << 30


def outcome(source: str, timeout: float = 30.0) -> dict:
    """Compile and render ``source`` in a bounded child; what happened, as a dict."""
    code = textwrap.dedent(f"""
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_BYTES}, {LIMIT_BYTES}))
        from serve_app.errors import InvalidRequestError
        from serve_app.model.chat_template import ChatTemplate
        t0 = time.monotonic()
        try:
            ChatTemplate({source!r}, "<s>", "</s>", origin="server.chat_template").render(
                [{{"role": "user", "content": "hi"}}])
            out = {{"result": "rendered"}}
        except InvalidRequestError as e:
            out = {{"result": "400", "message": e.message}}
        out["seconds"] = time.monotonic() - t0
        print(json.dumps(out))
    """)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"result": "timeout"}
    if p.returncode != 0:
        return {"result": "crashed", "stderr": p.stderr[-400:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


HOSTILE = {
    "constant_folded_at_compile": "{{ 'x' * 10**10 }}",
    "center_width": "{{ 'x'|center(10**10) }}",
    "doubling_with_tilde": "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
                           "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling_with_plus": "{% set ns = namespace(s='x' * 1000) %}{% for i in range(40) %}"
                          "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "join_of_repeated_list": "{{ (['x' * 1000000] * 100000)|join }}",
    "join_filter_with_a_big_separator": "{{ range(100000)|map('string')|join('x' * 4000000) }}",
    "join_method_with_a_big_separator": "{% set sep = 'x' * 4000000 %}{{ sep.join(range(100000)|map('string')) }}",
    "str_format_width": "{{ '{:>10000000000}'.format('x') }}",
    "percent_format_width": "{{ '%010000000000d' % 1 }}",
    "replace_growth": "{% set s = 'a' * 1000000 %}{{ s.replace('a', s)|length }}",
    "huge_power": "{{ 7 ** 1000000000 }}",
    "output_flood": "{% set s = 'y' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_a_bounded_400(name: str) -> None:
    out = outcome(HOSTILE[name])
    assert out["result"] == "400", out
    assert "server.chat_template" in out["message"]


def test_nested_loops_stop_at_the_deadline() -> None:
    src = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    out = outcome(src, timeout=20)
    assert out["result"] == "400" and "took too long" in out["message"], out
    assert out["seconds"] < 10


def test_loop_over_a_string_without_calls_stops_at_the_deadline_and_frees_its_thread() -> None:
    t = ChatTemplate("{% set s = 'z' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "", "")
    errors: list[BaseException] = []

    def render() -> None:
        try:
            t.render(MSGS)
        except InvalidRequestError as e:
            errors.append(e)

    worker = threading.Thread(target=render, daemon=True)
    t0 = time.monotonic()
    worker.start()
    worker.join(15)
    assert not worker.is_alive(), "the render kept its thread past the deadline"
    assert errors and time.monotonic() - t0 < 10


def test_unbounded_recursion_is_a_400() -> None:
    t = ChatTemplate("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "", "", origin="the GGUF's chat template")
    with pytest.raises(InvalidRequestError, match="the GGUF's chat template"):
        t.render(MSGS)


def test_overflow_is_a_400() -> None:
    with pytest.raises(InvalidRequestError, match="OverflowError"):
        ChatTemplate("{{ 2.0 ** 100000 }}", "", "").render(MSGS)


def test_deeply_nested_source_is_refused_at_compile() -> None:
    with pytest.raises(InvalidRequestError, match="does not compile"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "", "")


def test_tojson_writes_plain_json_like_hugging_face() -> None:
    msgs = [{"role": "user", "content": "<b>héllo</b> & 'q'"}]
    out = ChatTemplate("{{ messages|tojson }}", "", "").render(msgs)
    assert out == json.dumps(msgs, ensure_ascii=False)


def test_ordinary_templates_still_render() -> None:
    src = ("{% for m in messages %}{{ m['role']|upper ~ ': ' ~ m['content']|trim|replace('hi', 'hello') }}"
           "{% if not loop.last %}{{ '\\n' * 2 }}{% endif %}{% endfor %}{{ '%s-%d'|format('end', 3) }}"
           "{{ ', '.join(['a', 'b']) }}{{ range(3)|list|length }}{{ (messages|tojson(indent=2))[:1] }}")
    out = ChatTemplate(src, "", "").render([{"role": "user", "content": " hi "}, {"role": "assistant", "content": "ok"}])
    assert out == "USER: hello\n\nASSISTANT: okend-3a, b3["
    many = [{"role": "user", "content": "w" * 4000}] * 1000  # 4 MB of content joined with a separator: allowed
    assert len(ChatTemplate("{{ messages|map(attribute='content')|join('\n') }}", "", "").render(many[:900])) > 3_000_000
