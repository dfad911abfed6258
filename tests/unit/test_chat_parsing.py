"""Tool-call and reasoning parsers on the output each family's authors document: every call a model writes in
its family's format comes out as a call (name + JSON arguments), everything else as content, nothing is lost or
duplicated, and streaming the text in any split gives the same result as parsing it whole."""

from __future__ import annotations

import json

import pytest

from serve_app.chat.formats import Family
from serve_app.chat.output import ChatOutput, gather_calls
from serve_app.chat.reasoning import ThinkSplitter
from serve_app.chat.toolparse import ParsedCall, ToolCallParser, parse_generic
from serve_app.protocol import Delta, Done, Timings, Usage

PARIS = ParsedCall("get_weather", json.dumps({"city": "Paris"}))
ROME = ParsedCall("get_weather", json.dumps({"city": "Rome"}))


def parse(family: Family, text: str, step: int = 0) -> list:
    p = ToolCallParser(family)
    pieces = []
    if step:
        for i in range(0, len(text), step):
            pieces += p.feed(text[i:i + step])
    else:
        pieces += p.feed(text)
    pieces += p.finish()
    merged: list = []
    for x in pieces:  # adjacent content pieces from different feeds: one string
        if isinstance(x, str) and merged and isinstance(merged[-1], str):
            merged[-1] += x
        else:
            merged.append(x)
    return merged


CASES = [
    # Qwen2.5 / Hermes 2 Pro / Qwen3, as their templates instruct
    (Family.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', [PARIS]),
    (Family.HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
     ["Let me check.\n", PARIS, ROME]),
    (Family.HERMES, "No tools needed: 1 < 2 and <b>bold</b>.", ["No tools needed: 1 < 2 and <b>bold</b>."]),
    (Family.HERMES, "<tool_call>\nnot json\n</tool_call> after", ["<tool_call>\nnot json\n</tool_call> after"]),
    # Llama 3.1 / 3.2 JSON tool calling (custom tools), with or without the python tag
    (Family.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    (Family.LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', [PARIS]),
    (Family.LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_weather", "parameters": {"city": "Rome"}}', [PARIS, ROME]),
    (Family.LLAMA3, 'The set {"name"} is not a call.', ['The set {"name"} is not a call.']),
    # whitespace where JSON allows it, as a grammar may produce it
    (Family.LLAMA3, '{ "name" :"get_weather", "parameters":{ "city" :"Paris" } }', [PARIS]),
    (Family.LLAMA3, 'Use {"a": 1} or { } or {', ['Use {"a": 1} or { } or {']),
    # Mistral v0.3 / Nemo: a list after [TOOL_CALLS] (or bare, when the control token is not rendered)
    (Family.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome"}}]', [PARIS, ROME]),
    (Family.MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
     [PARIS]),
    (Family.MISTRAL, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', [PARIS]),
    (Family.MISTRAL, "Plain [answer].", ["Plain [answer]."]),
    # a template that takes tools but matches no family: a bare call object
    (Family.JSON, 'Sure. {"name": "get_weather", "arguments": {"city": "Paris"}}', ["Sure. ", PARIS]),
]


@pytest.mark.parametrize(("family", "text", "expected"), CASES)
@pytest.mark.parametrize("step", [0, 1, 3])
def test_family_parsers_find_the_documented_calls_in_any_split(family: Family, text: str, expected: list,
                                                               step: int) -> None:
    assert parse(family, text, step) == expected


def test_an_unfinished_call_is_a_call_when_its_json_is_whole_else_content() -> None:
    assert parse(Family.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}') == [PARIS]
    assert parse(Family.HERMES, '<tool_call>\n{"name": "get_wea') == ['<tool_call>\n{"name": "get_wea']
    assert parse(Family.LLAMA3, '{"name": "get_weather", "parameters": {"ci') == ['{"name": "get_weather", '
                                                                                  '"parameters": {"ci']


def test_generic_format() -> None:
    call = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}'
    calls = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
            '{"name": "get_weather", "arguments": {"city": "Rome"}}]}'
    assert parse_generic(call) == [PARIS]
    assert parse_generic(calls) == [PARIS, ROME]
    assert parse_generic('{"response": "Hello"}') == ["Hello"]
    assert parse_generic("free text") == ["free text"]


def split(text: str, opened: bool, step: int) -> tuple[str, str]:
    s = ThinkSplitter(opened)
    r, c = [], []
    for i in range(0, len(text), step):
        a, b = s.feed(text[i:i + step])
        r.append(a)
        c.append(b)
    a, b = s.finish()
    return "".join(r + [a]), "".join(c + [b])


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_thinking_splits_from_the_answer(step: int) -> None:
    # Qwen3 / QwQ: the model opens the block; DeepSeek-R1 distills: the prompt opened it
    assert split("<think>\nThe user wants a greeting.\n</think>\n\nHello!", False, step) == (
        "The user wants a greeting.\n", "Hello!")
    assert split("The user wants a greeting.\n</think>\n\nHello!", True, step) == (
        "The user wants a greeting.\n", "Hello!")
    assert split("No thinking here <think> at all", False, step) == ("", "No thinking here <think> at all")
    assert split("<think>cut off by the budget", False, step) == ("cut off by the budget", "")
    assert split("<thin", False, step) == ("", "<thin")


def drive(out: ChatOutput, text: str, step: int) -> list[Delta]:
    evs = [out.delta(Delta(text[i:i + step], 1)) for i in range(0, len(text), step)]
    last = out.final()
    return evs + ([last] if last else [])


@pytest.mark.parametrize("step", [1, 7, 1000])
def test_chat_output_streams_reasoning_content_and_calls_as_openai_does(step: int) -> None:
    text = ('<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
            '\n</tool_call>')
    out = ChatOutput(Family.HERMES, tools=True, think=ThinkSplitter(False))
    evs = drive(out, text, step)
    assert "".join(e.reasoning for e in evs) == "Need the weather.\n"
    assert "".join(e.text for e in evs).strip() == ""
    pieces = [c for e in evs for c in e.tool_calls or ()]
    assert [(p.index, p.name, p.arguments) for p in pieces] == [
        (0, "get_weather", ""), (0, None, PARIS.arguments), (1, "get_weather", ""), (1, None, ROME.arguments)]
    assert pieces[0].id.startswith("call_") and pieces[0].id != pieces[2].id
    calls = gather_calls(pieces)
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    done = out.done(Done("stop", Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2), Timings()))
    assert done.finish_reason == "tool_calls"


def test_mistral_call_ids_are_nine_alphanumerics_as_its_template_demands() -> None:
    out = ChatOutput(Family.MISTRAL, tools=True, think=None)
    evs = drive(out, '[TOOL_CALLS][{"name": "f", "arguments": {}}]', 1000)
    first = evs[0].tool_calls[0]
    assert len(first.id) == 9 and first.id.isalnum()


@pytest.mark.parametrize("family", [Family.HERMES, Family.LLAMA3, Family.MISTRAL, Family.JSON])
def test_json_nested_deeper_than_the_decoder_goes_is_content_not_an_error(family: Family) -> None:
    deep = "[" * 100_000
    for text in (f"<tool_call>{deep}</tool_call>", f"[TOOL_CALLS]{deep}", '{"name": "f", "arguments": ' + deep,
                 '<tool_call>{"name": "f", "arguments": "' + deep + '"}</tool_call>'):
        got = parse(family, text)
        assert "".join(p for p in got if isinstance(p, str)) == text and all(isinstance(p, str) for p in got)
    assert parse_generic(deep) == [deep]
