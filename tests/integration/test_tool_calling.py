"""Tool calling and reasoning on real llama.cpp, through LlamaModel's own code path (prompt building with the
real templates of each family, the engine with its grammar, the output parsers) in-process, plus one HTTP test
with the openai client on the session app.

Invariants: with tool_choice ``required`` or a named function every reply is a call that parses, names an offered
function and whose arguments match its parameters schema, in every family; ``auto`` gives plain content or valid
calls; ``none`` never a call; streamed tool-call deltas accumulate to the non-streamed calls; a bad
tools/tool_choice is a 400; tool and free requests share a batch; a thinking model's thoughts come back as
``reasoning_content``, streamed or not, and forced parallel calls may follow its thoughts; an XML-family
(Qwen3-Coder) call cut short comes back as content. Random weights only produce a parseable call through the
grammar, which is the point: these tests need the engine's grammar support (serve_app/engine/grammar.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve_app.cache.results import CachedFile
from serve_app.config import AppArgs
from serve_app.model.service import ModelService
from serve_app.protocol import (
    Delta,
    Done,
    ErrorEvent,
    GenerateRequest,
    Message,
    NamedToolChoice,
    SamplingParams,
    Tool,
    ToolFunction,
)
from tests.support import chat_templates as T
from tests.support.gguf_factory import ModelSpec, write_gguf

pytest.importorskip("serve_app.engine.grammar", reason="needs the engine's grammar support")
pytestmark = pytest.mark.timeout(180)

CITIES = ["Paris", "Rome"]
WEATHER = Tool(function=ToolFunction(name="get_weather", description="The weather in a city", parameters={
    "type": "object", "properties": {"city": {"type": "string", "enum": CITIES}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"], "additionalProperties": False}))
TIME = Tool(function=ToolFunction(name="get_time", parameters={
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
    "additionalProperties": False}))
ASK = (Message(role="user", content="What is the weather in Paris?"),)
FAMILIES = {"qwen2.5": T.QWEN25, "llama3.1": T.LLAMA31, "mistral-nemo": T.MISTRAL_NEMO, "qwen3": T.QWEN3,
            "r1-distill": T.R1_DISTILL, "qwen3-coder": T.QWEN3_CODER,
            "qwen3.5": T.QWEN35}


class Services:
    """One ModelService per template family on the real engine, all on one event loop."""

    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.services: dict[str, ModelService] = {}
        for name, tpl in FAMILIES.items():
            path = write_gguf(root / f"{name}.gguf", ModelSpec(chat_template=T.template(tpl), name=name))
            args = AppArgs.model_validate({"model": {"filename": path}, "cache_dir": str(root),
                                           "engine": {"n_parallel": 4, "n_ctx_per_slot": 2048}})
            self.services[name] = ModelService(args, self._fetch(path), use_gpu=False)
        self.run(self._start())

    @staticmethod
    def _fetch(path: str) -> Any:
        async def fetch(method: str, ref: dict[str, Any]) -> CachedFile:
            return CachedFile(repo_id="local", filename=Path(path).name, revision="main", commit="c" * 40,
                              path=path, size=Path(path).stat().st_size, sha256="ab" * 32, verified_at="now",
                              parts=[path])
        return fetch

    async def _start(self) -> None:
        for svc in self.services.values():
            svc.start()
        for _ in range(600):
            if all(s.loader.state != "loading" for s in self.services.values()):
                break
            await asyncio.sleep(0.05)
        assert all(s.loader.state == "ready" for s in self.services.values()), \
            {k: s.loader.reason for k, s in self.services.items()}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def complete(self, family: str, **kw: Any) -> Done:
        done = self.run(self.services[family].complete(request(**kw)))
        assert isinstance(done, Done), done
        return done

    def close(self) -> None:
        for svc in self.services.values():
            svc.close()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def request(**kw: Any) -> GenerateRequest:
    params = SamplingParams(**{"max_tokens": 160, "temperature": 0.0, **kw.pop("params", {})})
    return GenerateRequest(label="t", messages=kw.pop("messages", ASK), params=params, stream=False, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    s = Services(tmp_path_factory.mktemp("chat-models"))
    yield s
    s.close()


def check_calls(done: Done, names: set[str]) -> list[dict[str, Any]]:
    """The calls, each checked against its function's schema (the grammar's promise)."""
    assert done.tool_calls, (done.finish_reason, done.text)
    out = []
    for c in done.tool_calls:
        assert c.function.name in names and c.type == "function" and c.id
        args = json.loads(c.function.arguments)
        if c.function.name == "get_weather":
            assert set(args) == {"city", "metric"} and args["city"] in CITIES and isinstance(args["metric"], bool)
        else:
            assert set(args) == {"utc"} and isinstance(args["utc"], bool)
        out.append(args)
    return out


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.1", "mistral-nemo", "qwen3-coder"])
def test_required_and_named_calls_always_parse_and_match_the_schema(models: Services, family: str) -> None:
    done = models.complete(family, tools=(WEATHER, TIME), tool_choice="required", parallel_tool_calls=False)
    assert done.finish_reason == "tool_calls" and len(check_calls(done, {"get_weather", "get_time"})) == 1
    named = models.complete(family, tools=(WEATHER, TIME), tool_choice=NamedToolChoice(name="get_time"))
    assert named.finish_reason == "tool_calls"
    check_calls(named, {"get_time"})
    # parallel: one or more calls, each valid (a random model may keep calling until its budget)
    many = models.complete(family, tools=(WEATHER, TIME), tool_choice="required", params={"max_tokens": 200})
    check_calls(many, {"get_weather", "get_time"})
    # auto: plain content or valid calls; none: never a call
    auto = models.complete(family, tools=(WEATHER,), params={"temperature": 0.8, "seed": 1})
    if auto.tool_calls:
        check_calls(auto, {"get_weather"})
    none = models.complete(family, tools=(WEATHER,), tool_choice="none")
    assert none.tool_calls is None and none.finish_reason in ("stop", "length")


@pytest.mark.parametrize("family", ["qwen3", "qwen3.5"])
def test_thinking_template_with_thinking_off_forces_the_call_at_once(models: Services, family: str) -> None:
    done = models.complete(family, tools=(WEATHER,), tool_choice="required", parallel_tool_calls=False,
                           chat_template_kwargs={"enable_thinking": False})
    assert done.finish_reason == "tool_calls" and done.reasoning is None
    check_calls(done, {"get_weather"})


def test_reasoning_is_split_streamed_and_not(models: Services) -> None:
    # The R1 distill template opens <think> in the prompt: what the model writes is thinking until </think>.
    done = models.complete("r1-distill", params={"max_tokens": 24, "ignore_eos": True})
    assert done.reasoning and not done.text

    async def stream() -> tuple[str, str]:
        r, c = [], []
        async for ev in models.services["r1-distill"].generate(request(params={"max_tokens": 24, "ignore_eos": True})
                                                               .model_copy(update={"stream": True})):
            if isinstance(ev, Delta):
                r.append(ev.reasoning)
                c.append(ev.text)
            assert not isinstance(ev, ErrorEvent), ev
        return "".join(r), "".join(c)

    assert models.run(stream()) == (done.reasoning, done.text)
    raw = models.complete("r1-distill", params={"max_tokens": 24, "ignore_eos": True}, reasoning_format="none")
    assert raw.reasoning is None and raw.text == done.reasoning or raw.text.lstrip() == done.reasoning


def test_tool_and_free_requests_share_a_batch(models: Services) -> None:
    svc = models.services["qwen2.5"]

    async def together() -> list[Done | ErrorEvent]:
        reqs = [request(tools=(WEATHER,), tool_choice="required", parallel_tool_calls=False),
                request(params={"max_tokens": 32, "ignore_eos": True}),
                request(tools=(TIME,), tool_choice=NamedToolChoice(name="get_time")),
                request(params={"max_tokens": 32, "ignore_eos": True})]
        return await asyncio.gather(*[svc.complete(r) for r in reqs])

    calls, free, named, free2 = models.run(together())
    assert isinstance(calls, Done) and isinstance(named, Done)
    check_calls(calls, {"get_weather"})
    check_calls(named, {"get_time"})
    for d in (free, free2):
        assert isinstance(d, Done) and d.tool_calls is None and d.usage.completion_tokens == 32


def test_openai_client_streams_tool_call_deltas_that_add_up_to_the_call(llm_app: str) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{llm_app}/v1", api_key="x", max_retries=0)
    # The session app's context is 512 tokens per request: a small tool, so the generic tool prompt fits.
    tools: Any = [{"type": "function", "function": {"name": "get_time", "parameters": TIME.function.parameters}}]
    kw: Any = dict(model="acme/tiny-chat-GGUF/tiny-chat-F16", messages=[{"role": "user", "content": "weather?"}],
                   tools=tools, tool_choice="required", temperature=0, max_tokens=120)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    acc: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or ():
            slot = acc.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                assert not slot["id"] and d.function.name  # id and name come first, once
                slot["id"], slot["name"] = d.id, d.function.name
            slot["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in acc.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(**{**kw, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert "not in 'tools'" in str(e.value)
    with pytest.raises(BadRequestError):
        bad: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]
        client.chat.completions.create(**{**kw, "tools": bad, "tool_choice": "auto"})


def test_xml_family_streams_the_same_calls_and_a_cut_off_call_is_content(models: Services) -> None:
    props: dict[str, Any] = {"n": {"type": "integer"}, "unit": {"type": "string", "enum": ["C", "F"]}}
    counted = Tool(function=ToolFunction(name="count", parameters={"type": "object", "properties": props,
                                                                   "required": ["n", "unit"]}))
    kw: dict[str, Any] = dict(tools=(counted,), tool_choice="required", parallel_tool_calls=False)
    done = models.complete("qwen3-coder", **kw)
    [c] = done.tool_calls or []
    args = json.loads(c.function.arguments)
    assert done.finish_reason == "tool_calls" and isinstance(args["n"], int) and args["unit"] in ("C", "F")

    async def stream() -> tuple[str, list[tuple[str, str]]]:
        text, calls = [], {}
        async for ev in models.services["qwen3-coder"].generate(request(**kw).model_copy(update={"stream": True})):
            assert not isinstance(ev, ErrorEvent), ev
            if isinstance(ev, Delta):
                text.append(ev.text)
                for d in ev.tool_calls or ():
                    name, arguments = calls.get(d.index, ("", ""))
                    calls[d.index] = (d.name or name, arguments + d.arguments)
        return "".join(text), [calls[i] for i in sorted(calls)]

    assert models.run(stream()) == ("", [(c.function.name, c.function.arguments)])
    # These random weights (at temperature 0) do not close a free-text value: the forced call is cut by
    # max_tokens and comes back as content, with no error (as does any call cut short).
    noted = counted.model_copy(update={"function": counted.function.model_copy(update={"parameters": {
        "type": "object", "properties": {**props, "note": {"type": "string"}}, "required": ["n", "unit", "note"]}})})
    for budget in (6, 60):
        cut = models.complete("qwen3-coder", params={"max_tokens": budget}, **{**kw, "tools": (noted,)})
        assert cut.finish_reason == "length" and cut.tool_calls is None
        assert cut.text and cut.text.startswith("<tool_")
    # A parameter schema the grammar cannot enforce is the client's 400, naming the tools, before any slot.
    bad = Tool(function=ToolFunction(name="f", parameters={"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 1}}}))
    err = models.run(models.services["qwen3-coder"].complete(request(tools=(bad,), tool_choice="required")))
    assert isinstance(err, ErrorEvent) and err.error.status == 400 and err.error.param == "tools"


def grammar_takes(spec: Any, model: Any, text: str) -> bool:
    """Whether llama.cpp's grammar engine, compiled from ``spec``, takes ``text`` token by token (never accepting a
    refused token) and may end there."""
    from serve_app.engine import compile_grammar
    from serve_app.engine.grammar import _spelled

    g = compile_grammar(spec, model)
    try:
        toks = _spelled(text, model)  # tokens whose pieces are exactly the text (no SentencePiece space)
        assert toks and b"".join(model.piece(t, special=True) for t in toks) == text.encode()
        for t in toks:
            if not g.allows(t):
                return False
            g.accept(t)
        return g.allows(model.eos)
    finally:
        g.close()


def test_xml_grammar_takes_exactly_the_calls_it_promises(models: Services) -> None:
    from serve_app.chat.xmlgrammar import xml_grammar

    loaded = models.services["qwen3-coder"].loader.loaded
    assert loaded is not None
    model = loaded.model
    noted = Tool(function=ToolFunction(name="note", parameters={
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}))

    def takes(text: str, tools: tuple[Tool, ...] = (WEATHER, TIME), parallel: bool = False) -> bool:
        return grammar_takes(xml_grammar(tools, lazy=False, parallel=parallel), model, text)

    def weather(*params: tuple[str, str]) -> str:
        body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
        return f"<tool_call>\n<function=get_weather>\n{body}</function>\n</tool_call>"

    assert takes(weather(("city", "Paris"), ("metric", "true")))
    assert takes(weather(("metric", "false"), ("city", "Rome")))  # any order
    assert takes(weather(("city", "Paris"), ("metric", "true")) + "\n" + weather(("city", "Rome"), ("metric", "true")),
                 parallel=True)
    assert not takes(weather(("city", "Paris"), ("metric", "true")) + "\n" + weather(("city", "Rome"), ("metric", "true")))
    assert not takes(weather(("city", "Paris")))                                       # a required one missing
    assert not takes(weather(("city", "Paris"), ("metric", "true"), ("city", "Rome")))  # twice
    assert not takes(weather(("city", "Paris"), ("metric", "true"), ("wind", "1")))    # undeclared
    assert not takes(weather(("city", "London"), ("metric", "true")))                  # not in the enum
    assert not takes(weather(("city", "Paris"), ("metric", "yes")))                    # not a boolean
    assert not takes("<tool_call>\n<function=get_date>\n</function>\n</tool_call>")    # not offered
    free = "<tool_call>\n<function=note>\n<parameter=text>\n{}\n</parameter>\n</function>\n</tool_call>"
    assert takes(free.format("a <b> </param </parameter </tool_call>\nx"), (noted,))
    assert not takes(free.format("a</parameter>b"), (noted,))  # the value cannot hold its closing tag


def test_forced_parallel_calls_after_thinking_close_the_thoughts_once(models: Services) -> None:
    from serve_app.chat.formats import Family
    from serve_app.chat.grammars import after_thinking, tool_grammar

    loaded = models.services["qwen3"].loader.loaded
    assert loaded is not None
    model = loaded.model
    spec = after_thinking(tool_grammar(Family.HERMES, (WEATHER, TIME), lazy=False, parallel=True))

    def takes(text: str) -> bool:
        return grammar_takes(spec, model, text)

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "metric": true}}\n</tool_call>'
    other = '<tool_call>\n{"name": "get_time", "arguments": {"utc": false}}\n</tool_call>'
    thoughts = "(two cities, two calls)</think>\n\n"  # spelled exactly (no word-initial SentencePiece space)
    assert takes(thoughts + call)
    assert takes(thoughts + call + "\n" + other)  # parallel calls after the thoughts
    assert not takes(thoughts + call + "\n</think>\n\n" + other)  # the thoughts close once
    assert not takes(thoughts + "the weather is fine")  # after </think>: a call, nothing else
