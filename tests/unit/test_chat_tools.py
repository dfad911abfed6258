"""Tools and reasoning from request to prompt to grammar to reply, without a model: each real template's family
is detected; tools and tool-call history reach every template (in its own format, or as a system prompt for one
that ignores tools); each tool_choice yields the grammar that makes the family's call parse (forced, lazy from the
trigger, or none), applied after the thinking of a reasoning model; bad tools/tool_choice are 400s; and the model
service turns the model's text into OpenAI's content / reasoning_content / tool_calls with finish_reason
"tool_calls". The engine is a fake here; tests/integration/test_tool_calling.py runs the real one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.chat.formats import Family, detect
from serve_app.chat.grammars import after_thinking, tool_grammar
from serve_app.chat.plan import plan_chat
from serve_app.errors import InvalidRequestError
from serve_app.ingress.openai import parse
from serve_app.ingress.tools import chat_messages, tool_fields
from serve_app.model.chat_template import ChatTemplate
from serve_app.protocol import (
    Delta,
    Done,
    FunctionCall,
    GenerateRequest,
    GrammarSpec,
    Message,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolFunction,
)
from serve_app.schemas import ChatCompletionRequest
from tests.support import chat_templates as T
from tests.support.fake_model import Harness, events, run

WEATHER = Tool(function=ToolFunction(name="get_weather", description="The weather in a city", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
TIME = Tool(function=ToolFunction(name="get_time", parameters={"type": "object", "properties": {}}))

HISTORY = (
    Message(role="user", content="Weather in Paris?"),
    Message(role="assistant", content=None, tool_calls=(
        ToolCall(id="a1b2c3d4e", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')),)),
    Message(role="tool", content='{"temp_c": 21}', tool_call_id="a1b2c3d4e", name="get_weather"),
    Message(role="assistant", content="21 degrees."),
    Message(role="user", content="And Rome?"),
)


@pytest.mark.parametrize(("name", "family", "thinking"), [
    (T.QWEN25, Family.HERMES, False), (T.HERMES3, Family.HERMES, False), (T.QWEN3, Family.HERMES, True),
    (T.LLAMA31, Family.LLAMA3, False), (T.LLAMA32, Family.LLAMA3, False), (T.MISTRAL_NEMO, Family.MISTRAL, False),
    (T.R1_DISTILL, Family.GENERIC, True), (T.GEMMA2, Family.GENERIC, False), (T.QWEN3_CODER, Family.XML, False),
    (T.QWEN35, Family.XML, True)])
def test_templates_are_recognised_and_render_tools_and_tool_history(name: str, family: Family,
                                                                    thinking: bool) -> None:
    fmt = detect(T.template(name))
    assert (fmt.family, fmt.thinking) == (family, thinking)
    if name == T.GEMMA2:
        fmt = fmt.__class__(fmt.family, fmt.thinking, system_role=False)
    req = GenerateRequest(label="r", messages=HISTORY, tools=(WEATHER,))
    plan = plan_chat(fmt, req, "auto")
    prompt = ChatTemplate(T.template(name), "<s>", "</s>").render(plan.messages, tools=plan.tools,
                                                                  variables=plan.variables)
    assert "get_weather" in prompt and "The weather in a city" in prompt  # the tool reached the model
    assert "Paris" in prompt and "21" in prompt and prompt.rstrip().endswith(("assistant", "Assistant｜>", "[/INST]",
                                                                              "<think>", "model", "<|end_header_id|>"))


@pytest.mark.parametrize(("family", "prefix", "suffix", "trigger"), [
    (Family.HERMES, "<tool_call>\n", "\n</tool_call>", "<tool_call>"),
    (Family.MISTRAL, "[TOOL_CALLS]", "", "[TOOL_CALLS]"),
    (Family.LLAMA3, "", "", '{"name"'),
    (Family.JSON, "", "", '{"name"')])
def test_each_tool_choice_gets_the_grammar_of_its_family(family: Family, prefix: str, suffix: str,
                                                         trigger: str) -> None:
    def grammar(**kw: Any) -> GrammarSpec | None:
        req = GenerateRequest(label="r", messages=HISTORY[:1], tools=(WEATHER, TIME), **kw)
        return plan_chat(detect({Family.HERMES: "<tool_call>", Family.MISTRAL: "[TOOL_CALLS]",
                                 Family.LLAMA3: "<|start_header_id|>ipython", Family.JSON: "tools"}[family]),
                         req, "auto").grammar("prompt")

    required = grammar(tool_choice="required")
    assert required is not None and (required.prefix, required.suffix, required.triggers) == (prefix, suffix, ())
    schema = json.dumps(required.json_schema)
    assert '"get_weather"' in schema and '"get_time"' in schema and '"city"' in schema
    named = grammar(tool_choice=NamedToolChoice(name="get_time"))
    assert named is not None and "get_weather" not in json.dumps(named.json_schema) and not named.repeat
    auto = grammar()
    assert auto is not None and auto.triggers == (trigger,) and auto.prefix.startswith(trigger.split('{')[0])
    assert grammar(tool_choice="none") is None
    single = grammar(tool_choice="required", parallel_tool_calls=False)
    assert single is not None and not single.repeat and single.json_schema.get("maxItems", 1) == 1


def test_generic_format_is_enforced_whole_and_a_thinking_model_is_constrained_after_its_thoughts() -> None:
    forced = tool_grammar(Family.GENERIC, (WEATHER,), lazy=False, parallel=True)
    assert forced.triggers == () and "tool_calls" in forced.json_schema["properties"]
    auto = tool_grammar(Family.GENERIC, (WEATHER,), lazy=True, parallel=False)
    assert "anyOf" in auto.json_schema and "response" in json.dumps(auto.json_schema)
    json_answer = GrammarSpec(json_schema={"type": "object"})
    assert after_thinking(json_answer) == GrammarSpec(json_schema={"type": "object"}, lead="</think>\n\n",
                                                      triggers=("</think>",))
    fmt = detect(T.template(T.QWEN3))
    req = GenerateRequest(label="r", messages=HISTORY[:1], tools=(WEATHER,), tool_choice="required")
    thinking = plan_chat(fmt, req, "auto").grammar("<|im_start|>assistant\n")
    assert thinking is not None and thinking.triggers == ("</think>",)
    assert (thinking.lead, thinking.prefix, thinking.repeat) == ("</think>\n\n", "<tool_call>\n", True)
    assert thinking.start == "</think>\n\n<tool_call>\n"  # parallel calls after the thoughts: </think> once
    # enable_thinking=false: the template closed the thoughts in the prompt, so the call is forced at once
    closed = plan_chat(fmt, req, "auto").grammar("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert closed is not None and closed.triggers == () and closed.prefix == "<tool_call>\n"


def body(**kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize(("fields", "problem"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in 'tools'"),
    ({"tool_choice": "required"}, "needs at least one tool"),
    ({"tools": TOOLS + TOOLS}, "unique"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "'object'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"chat_template_kwargs": {"messages": []}}, "cannot be set"),
])
def test_bad_tools_and_tool_choice_are_client_errors(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        parse(ChatCompletionRequest, body(**fields))
    assert problem in e.value.message


def test_openai_history_and_tool_fields_become_protocol_values() -> None:
    req: ChatCompletionRequest = parse(ChatCompletionRequest, {
        "messages": [{"role": "user", "content": "w?"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "reasoning_format": "none"})
    msgs = chat_messages(req.messages)
    assert msgs[1].content is None and msgs[1].tool_calls[0].function.name == "get_weather"
    assert msgs[2].tool_call_id == "call_1"
    fields = tool_fields(req)
    assert fields["tool_choice"] == NamedToolChoice(name="get_weather") and fields["parallel_tool_calls"] is False
    assert fields["reasoning_format"] == "none" and fields["tools"][0].function.parameters["type"] == "object"


@pytest.fixture
def no_compile(monkeypatch: pytest.MonkeyPatch) -> list[GrammarSpec]:
    """The engine's grammar compiler needs a real vocabulary: record the specs instead."""
    seen: list[GrammarSpec] = []

    def record(spec: GrammarSpec, model: Any) -> None:
        seen.append(spec)

    monkeypatch.setattr("serve_app.model.service.compile_grammar", record, raising=False)
    return seen


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def test_the_model_service_returns_calls_and_reasoning_parsed_from_the_text(no_compile: list) -> None:
    async def main() -> None:
        svc = await Harness(template=T.template(T.QWEN3), reply="<think>\nRome? Call it.\n</think>\n\n" + CALL_TEXT,
                            n_ctx_seq=4096).ready()
        req = GenerateRequest(label="r", messages=HISTORY, tools=(WEATHER,), stream=False)
        done = await svc.complete(req)
        assert isinstance(done, Done) and done.finish_reason == "tool_calls"
        assert done.reasoning == "Rome? Call it.\n" and done.text == ""
        assert done.tool_calls and json.loads(done.tool_calls[0].function.arguments) == {"city": "Rome"}
        streamed = await events(svc, req.model_copy(update={"stream": True}))
        assert streamed[-1].finish_reason == "tool_calls"
        pieces = [c for e in streamed if isinstance(e, Delta) for c in e.tool_calls or ()]
        assert [p.name for p in pieces] == ["get_weather", None] and pieces[0].arguments == ""
        # tool_choice none: no tools in the prompt, no grammar, the text is content
        none = await svc.complete(req.model_copy(update={"tool_choice": "none", "reasoning_format": "none"}))
        assert isinstance(none, Done) and none.tool_calls is None and none.finish_reason == "stop"
        assert none.text.startswith("<think>")

    run(main())


def test_the_engine_gets_the_tool_grammar_and_the_template_its_tools(no_compile: list) -> None:
    async def main() -> None:
        h = Harness(template=T.template(T.QWEN25), reply=CALL_TEXT, n_ctx_seq=4096)
        svc = await h.ready()
        await svc.complete(GenerateRequest(label="r", messages=HISTORY, tools=(WEATHER,), tool_choice="required"))
        sent = h.engine.submitted[-1]
        assert sent.params.grammar is not None and sent.params.grammar.prefix == "<tool_call>\n"
        assert "get_weather" in h.vocab.detokenize(sent.prompt) and "<tools>" in h.vocab.detokenize(sent.prompt)
        await svc.complete(GenerateRequest(label="r", messages=HISTORY))
        assert h.engine.submitted[-1].params.grammar is None
        assert [g.prefix for g in no_compile] == ["<tool_call>\n"]  # compiled before the engine got it

    run(main())
