"""The XML tool-call family (Qwen3-Coder, Qwen3.5): its templates are recognised; every call written in its shape
comes out as a call whose arguments are JSON typed by the tool's schema (a non-string value parsed as JSON when it
parses, else kept as text); content around calls is kept; a malformed block comes back as content, never an error;
any streaming split gives the same pieces as the whole text; and tool_choice required/named/auto get a grammar
that only admits offered functions and their declared parameters. Pure: no model (the engine runs the grammar in
tests/integration/test_tool_calling.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.chat.formats import Family, detect
from serve_app.chat.output import ChatOutput, gather_calls
from serve_app.chat.plan import plan_chat
from serve_app.chat.toolparse import ParsedCall, Piece, ToolCallParser
from serve_app.chat.xmlcalls import convert
from serve_app.chat.xmlgrammar import excluding, xml_grammar
from serve_app.errors import InvalidRequestError
from serve_app.model.chat_template import ChatTemplate
from serve_app.protocol import (
    Delta,
    Done,
    FunctionCall,
    GenerateRequest,
    Message,
    NamedToolChoice,
    Timings,
    Tool,
    ToolCall,
    ToolFunction,
    Usage,
)
from tests.support import chat_templates as T

WEATHER = Tool(function=ToolFunction(name="get_weather", parameters={
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "options": {"type": "object"},
        "hours": {"type": "array", "items": {"type": "integer"}}, "metric": {"type": "boolean"},
        "limit": {"type": ["integer", "null"]}, "label": {"type": ["string", "integer"]}}}))
TIME = Tool(function=ToolFunction(name="get_time", parameters={"type": "object", "properties": {}}))
TOOLS = (WEATHER, TIME)


def call(name: str, body: str) -> str:
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def param(name: str, value: str) -> str:
    return f"<parameter={name}>\n{value}\n</parameter>\n"


def parse(text: str, step: int = 0) -> list[Piece]:
    p = ToolCallParser(Family.XML, TOOLS)
    pieces: list[Piece] = []
    for i in range(0, len(text), step or len(text) or 1):
        pieces += p.feed(text[i:i + (step or len(text))])
    pieces += p.finish()
    merged: list[Piece] = []
    for x in pieces:
        if isinstance(x, str) and merged and isinstance(merged[-1], str):
            merged[-1] += x
        else:
            merged.append(x)
    return merged


def args(piece: Piece) -> dict[str, Any]:
    assert isinstance(piece, ParsedCall), piece
    out: dict[str, Any] = json.loads(piece.arguments)
    return out


@pytest.mark.parametrize(("name", "thinking"), [(T.QWEN3_CODER, False), (T.QWEN35, True)])
def test_xml_templates_are_recognised_before_hermes(name: str, thinking: bool) -> None:
    fmt = detect(T.template(name))
    assert (fmt.family, fmt.thinking) == (Family.XML, thinking)
    assert detect(T.template(T.QWEN3)).family is Family.HERMES  # <tool_call> with JSON inside stays Hermes
    # llama-server leaves the variant without a newline between the tags to other parsers
    assert detect("<tool_call><parameter= {{ '<tool_call><function=' ~ tool_call.name ~ '>' }}").family \
        is Family.HERMES


def test_one_call_with_values_typed_by_the_schema() -> None:
    body = (param("city", "Paris") + param("days", "3") + param("options", '{"units": "C", "wind": [1, 2]}')
            + param("hours", "[6, 12]") + param("metric", "true") + param("limit", "null")
            + param("label", "42"))
    [got] = parse(call("get_weather", body))
    assert isinstance(got, ParsedCall) and got.name == "get_weather"
    assert args(got) == {"city": "Paris", "days": 3, "options": {"units": "C", "wind": [1, 2]}, "hours": [6, 12],
                         "metric": True, "limit": None, "label": 42}
    assert list(args(got)) == ["city", "days", "options", "hours", "metric", "limit", "label"]  # written order


@pytest.mark.parametrize(("raw", "schema", "value"), [
    ("\n3\n", {"type": "string"}, "3"),                  # a string stays text, even when it looks like JSON
    ("\n  two lines\nof text \n", {"type": "string"}, "  two lines\nof text "),  # only the layout newlines go
    ("\nthree\n", {"type": "integer"}, "three"),         # broken JSON: kept as the model wrote it
    ("\n 7 \n", {"type": "integer"}, 7),
    ("\nTrue\n", {"type": "boolean"}, True),             # Python's spelling, as models trained on it write
    ("\nNaN\n", {"type": "number"}, "NaN"),              # not JSON: arguments must stay valid JSON
    ("[" * 100_000, {"type": "array"}, "[" * 100_000),    # too deep for the decoder: text, never an error
    ("\nhello\n", {"type": ["string", "integer"]}, "hello"),
    ("\n[1]\n", {"type": ["string", "integer"]}, "[1]"),  # parses, but not as one of the other types
    ("\n5\n", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 5),
    ("\n{\"a\": 1}\n", {"description": "untyped"}, '{"a": 1}'),  # no type: text, as vLLM does
    ("\n{\"a\": 1}\n", None, '{"a": 1}'),                # a parameter the tool does not declare
    ("\nfalse\n", {"$ref": "#/$defs/Flag"}, False),       # typed through a local reference
    ("\nfalse\n", {"$ref": "#/$defs/Loop"}, "false"),     # a reference cycle says nothing: text
])
def test_value_conversion(raw: str, schema: Any, value: Any) -> None:
    root = {"$defs": {"Flag": {"type": "boolean"}, "Loop": {"$ref": "#/$defs/Loop"}}}
    assert convert(raw, schema, root) == value


def test_parallel_calls_and_content_around_them() -> None:
    text = ("Let me check.\n\n" + call("get_weather", param("city", "Paris")) + "\n"
            + call("get_weather", param("city", "Rome") + param("days", "2")) + "\n" + call("get_time", ""))
    got = parse(text)
    assert got[0] == "Let me check.\n\n"
    assert [(c.name, args(c)) for c in got[1:] if isinstance(c, ParsedCall)] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": 2}), ("get_time", {})]
    assert len(got) == 4


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 11])
def test_streaming_in_any_split_gives_the_whole_texts_pieces(step: int) -> None:
    # tags split across token boundaries everywhere, a value holding '<', '</tool_call>' and '</function'
    text = ("Sure <b>now</b>:\n" + call("get_weather", param("city", "a < b </tool_call> </function")
                                         + param("days", "4"))
            + "\n" + call("get_time", "") + " trailing")
    whole = parse(text)
    assert parse(text, step) == whole
    assert whole[0] == "Sure <b>now</b>:\n" and whole[-1] == "trailing"  # separators after calls go
    assert args(whole[1]) == {"city": "a < b </tool_call> </function", "days": 4}


def test_a_bare_function_tag_of_an_offered_tool_is_a_call() -> None:
    # Qwen3-Coder sometimes drops the outer <tool_call>; only offered names count, so prose stays prose.
    [got] = parse("<function=get_time>\n</function>")
    assert isinstance(got, ParsedCall) and got.name == "get_time"
    assert parse("#include <functional>\nx = <function=other>\n</function>") == [
        "#include <functional>\nx = <function=other>\n</function>"]


@pytest.mark.parametrize("text", [
    "<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>",            # JSON, not this family's shape
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis",   # cut off inside a value
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",  # no </function>
    "<tool_call>\n<function=get_weather\n<parameter=city>\nParis\n</parameter>\n</function>",  # name not closed
    "<tool_call>\n<function=>\n</function>\n</tool_call>",            # no name
    "<tool_call>\n<function=get_weather>\nParis\n</function>\n</tool_call>",  # text where a parameter goes
    "<tool_call>\n<function=" + "x" * 300,                            # a name too long to be one
])
def test_a_malformed_block_is_content(text: str) -> None:
    for step in (0, 1, 4):
        assert parse("ok " + text, step) == ["ok " + text]


@pytest.mark.parametrize("step", [0, 1, 3])
def test_a_malformed_block_does_not_hide_a_good_call_after_it(step: int) -> None:
    # what the parser kept of the bad block (its name, a parameter) must not leak into the next one
    bad = "<tool_call>\n<function=get_weather>\n" + param("city", "Oslo") + "garbage\n</tool_call>\n"
    got = parse(bad + call("get_time", param("utc", "1")), step)
    assert got[0] == bad and len(got) == 2
    assert isinstance(got[1], ParsedCall) and got[1].name == "get_time" and args(got[1]) == {"utc": "1"}


def test_chat_output_streams_id_and_name_then_the_arguments() -> None:
    out = ChatOutput(Family.XML, tools=True, think=None, offered=TOOLS)
    text = "Hi " + call("get_weather", param("city", "Paris") + param("days", "3"))
    deltas = [out.delta(Delta(text[i:i + 3], 1)) for i in range(0, len(text), 3)]
    last = out.final()
    deltas += [last] if last else []
    assert "".join(d.text for d in deltas) == "Hi "
    pieces = [p for d in deltas for p in d.tool_calls or ()]
    assert pieces[0].id and pieces[0].name == "get_weather" and pieces[0].arguments == ""
    [c] = gather_calls(pieces)
    assert json.loads(c.function.arguments) == {"city": "Paris", "days": 3}
    done = out.done(Done("stop", Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2), Timings()))
    assert done.finish_reason == "tool_calls"


def test_the_grammar_admits_offered_functions_and_declared_parameters() -> None:
    spec = xml_grammar(TOOLS, lazy=False, parallel=True)
    assert (spec.prefix, spec.suffix, spec.repeat, spec.triggers) == ("<tool_call>\n", "</tool_call>", True, ())
    g = spec.gbnf or ""
    assert 'root ::= call0 | call1' in g
    # seven parameters: past the any-order bound, the required one first, then each optional one at most once
    assert 'call0 ::= "<function=get_weather>\\n" call0-left1 call0-arg1? call0-arg2? ' in g
    assert "call0-left1 ::= call0-arg0\n" in g
    assert 'call1 ::= "<function=get_time>\\n"  "</function>\\n"' in g
    assert '"<parameter=city>\\n" xml-text "\\n</parameter>\\n"' in g  # a string: free text
    assert '"<parameter=label>\\n" xml-text ' in g                    # string-or-integer: free text too
    assert '"<parameter=days>\\n" integer ' in g                      # typed: the JSON schema's rule
    lazy = xml_grammar((TIME,), lazy=True, parallel=False)
    assert lazy.triggers == ("<tool_call>",) and not lazy.repeat
    enum = Tool(function=ToolFunction(name="f", parameters={"type": "object", "properties": {
        "c": {"type": "string", "enum": ["Paris", "Rome"]}}}))
    assert '"<parameter=c>\\n" ("Paris" | "Rome") ' in (xml_grammar((enum,), lazy=False, parallel=False).gbnf or "")


def test_free_text_rule_excludes_exactly_the_closing_tag() -> None:
    # The automaton, run directly: the rules' states must track the longest prefix of the word seen so far.
    rules = dict(line.split(" ::= ") for line in excluding("abab", "t").splitlines())
    assert rules["t-03"] == "| [a] t-01 | [^ab] t"  # after "aba": 'b' would complete it, 'a' restarts at "a"
    assert rules["t-02"] == "| [a] t-03 | [^a] t"


def test_plan_uses_the_xml_grammar_and_refuses_unenforceable_tools() -> None:
    fmt = detect(T.template(T.QWEN3_CODER))
    ask = (Message(role="user", content="Weather?"),)
    req = GenerateRequest(label="r", messages=ask, tools=TOOLS, tool_choice=NamedToolChoice(name="get_time"))
    spec = plan_chat(fmt, req, "auto").grammar("")
    assert spec is not None and spec.gbnf is not None and "get_weather" not in spec.gbnf and not spec.repeat
    bad = Tool(function=ToolFunction(name="f", parameters={"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1}}}))
    with pytest.raises(InvalidRequestError) as e:
        plan_chat(fmt, req.model_copy(update={"tools": (bad,), "tool_choice": "required"}), "auto").grammar("")
    assert e.value.param == "tools" and "minimum" in e.value.message


def test_grammar_takes_a_few_parameters_in_any_order_and_resolves_refs() -> None:
    tool = Tool(function=ToolFunction(name="f", parameters={
        "type": "object", "required": ["b", "a"], "$defs": {"Unit": {"type": "boolean"}},
        "properties": {"a": {"type": "integer"}, "o": {"type": "string"}, "b": {"$ref": "#/$defs/Unit"}}}))
    g = xml_grammar((tool,), lazy=False, parallel=False).gbnf or ""
    # arg0..2 are a, b (required, in the properties' order) and o; leftN: the set still to write, as a bit mask
    assert 'call0 ::= "<function=f>\\n" call0-left7 "</function>\\n"' in g
    assert "call0-left7 ::= call0-arg0 call0-left6 | call0-arg1 call0-left5 | call0-arg2 call0-left3\n" in g
    assert "call0-left4 ::=  | call0-arg2\n" in g  # only the optional one left: it may be skipped
    assert "call0-left3 ::= call0-arg0 call0-left2 | call0-arg1 call0-left1\n" in g  # both required: no end
    assert '"<parameter=a>\\n" integer ' in g and '"<parameter=b>\\n" tool0-' in g and "boolean" in g


@pytest.mark.parametrize("name", [T.QWEN3_CODER, T.QWEN35])
def test_a_call_in_history_as_the_template_writes_it_parses_back_to_the_same_call(name: str) -> None:
    sent = {"city": "Paris", "days": 3, "options": {"u": "C", "n": [1]}, "hours": [6, 12], "metric": True,
            "limit": None, "label": "x"}
    turn = Message(role="assistant", content=None, tool_calls=(ToolCall(id="c1", function=FunctionCall(
        name="get_weather", arguments=json.dumps(sent))),))
    req = GenerateRequest(label="r", messages=(Message(role="user", content="Weather?"), turn), tools=TOOLS)
    plan = plan_chat(detect(T.template(name)), req, "auto")
    prompt = ChatTemplate(T.template(name), "<s>", "</s>").render(plan.messages, tools=plan.tools,
                                                                  variables=plan.variables)
    written = prompt[prompt.index("<tool_call>\n<function=get_weather>"):]
    got = [p for p in parse(written) if isinstance(p, ParsedCall)]
    # booleans and null come out of the template in Python's spelling ("True", "None"): read back as JSON's
    assert len(got) == 1 and args(got[0]) == sent


@pytest.mark.parametrize("step", [0, 1, 4])
def test_a_call_opened_inside_the_thinking_ends_it(step: int) -> None:
    # Qwen3.5 may write <tool_call> without closing </think>: the call is the answer (llama-server's reading).
    fmt = detect(T.template(T.QWEN35))
    req = GenerateRequest(label="r", messages=(Message(role="user", content="Weather?"),), tools=TOOLS)
    out = plan_chat(fmt, req, "auto").output("<|im_start|>assistant\n<think>\n")
    assert out is not None
    text = "I should look it up.\n" + call("get_weather", param("city", "Paris"))
    deltas = [out.delta(Delta(text[i:i + (step or len(text))], 1)) for i in range(0, len(text), step or len(text))]
    last = out.final()
    deltas += [last] if last else []
    assert "".join(d.reasoning for d in deltas) == "I should look it up.\n"
    assert "".join(d.text for d in deltas) == ""
    [c] = gather_calls([p for d in deltas for p in d.tool_calls or ()])
    assert json.loads(c.function.arguments) == {"city": "Paris"}
    # without tools, <tool_call> is just text of the thinking
    plain = plan_chat(fmt, req.model_copy(update={"tools": ()}), "auto").output("<think>\n")
    assert plain is not None and plain.think is not None and plain.think.ends == ()
