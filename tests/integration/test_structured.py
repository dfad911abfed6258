"""Structured output and logprobs on real llama.cpp: a random-weight model's output parses and validates only because
the grammar holds, in batches that mix constrained and free requests (the free ones unchanged); sample-first
decoding gives exactly the full-mask result; a lazy grammar leaves the text free until its trigger; a grammar that
ends ends the output; logprobs are the model's log-softmax (the greedy token is the top-1, the top ones sum to at
most 1), batched or not. Over HTTP: the real ``openai`` client's ``chat.completions.parse`` with a pydantic model,
streamed JSON schemas, llama-server's ``json_schema`` / ``grammar`` fields, OpenAI's logprob shapes, and a bad
schema or grammar refused with a 400 naming it before any slot is taken. RunPod jobs carry the same fields."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import EngineConfig
from serve_app.engine import GrammarSampler, compile_grammar, load_engine, open_stream
from serve_app.errors import InvalidRequestError
from serve_app.protocol import Delta, Done, GrammarSpec, SamplingParams, TokenLogprob
from serve_app.runpod.input import normalise
from serve_app.schemas import ChatCompletionRequest

pytestmark = pytest.mark.timeout(180)


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog"]
    ok: bool


SCHEMA = Pet.model_json_schema()
PROMPT = "the quick brown fox says"


@pytest.fixture(scope="module")
def loaded(tiny_model: Path):
    eng, model, _ = load_engine(str(tiny_model), EngineConfig(n_parallel=4, n_ctx_per_slot=256, max_queued_requests=4,
                                                              prefill_chunk=64), want_gpu=False)
    yield eng, model
    eng.shutdown()


async def run(loaded, params: SamplingParams, spec: GrammarSpec | None = None, prompt: str = PROMPT,
              grammar: GrammarSampler | None = None, stream: bool = True) -> tuple[str, Done, list[TokenLogprob]]:
    eng, model = loaded
    if spec is not None and grammar is None:
        grammar = compile_grammar(spec, model)
    s = open_stream(eng, "t", model.tokenize(prompt, True, False), params, stream=stream, grammar=grammar)
    text, lps = [], []
    async for ev in s.events():
        if isinstance(ev, Delta):
            text.append(ev.text)
            lps += ev.logprobs or []
        else:
            assert isinstance(ev, Done), ev
            return "".join(text), ev, lps
    raise AssertionError("no final event")


def test_constrained_and_free_requests_decode_together(loaded) -> None:
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    specs = [GrammarSpec(json_schema=SCHEMA), None, GrammarSpec(json_schema=SCHEMA), None]
    params = [SamplingParams(max_tokens=120, temperature=0), free,
              SamplingParams(max_tokens=120, temperature=0.9, seed=7), free]

    async def main():
        together = await asyncio.gather(*[run(loaded, p, s, prompt=f"{PROMPT} {i}")
                                          for i, (p, s) in enumerate(zip(params, specs, strict=True))])
        alone = [await run(loaded, free, prompt=f"{PROMPT} {i}") for i in (1, 3)]
        return together, alone

    together, alone = asyncio.run(main())
    for text, done, _ in (together[0], together[2]):
        assert done.finish_reason == "stop", text
        Pet.model_validate_json(text)
    assert [together[1][0], together[3][0]] == [a[0] for a in alone]


def test_sample_first_gives_the_full_mask_result(loaded) -> None:
    _, model = loaded
    out = {}
    for full in (True, False):
        GrammarSampler.full_mask_always = full
        try:
            g = compile_grammar(GrammarSpec(json_schema=SCHEMA), model)
            text, done, _ = asyncio.run(run(loaded, SamplingParams(max_tokens=120, temperature=0), grammar=g))
        finally:
            GrammarSampler.full_mask_always = False
        out[full] = (text, done.usage.completion_tokens, g.full_masks)
    assert out[True][:2] == out[False][:2]
    assert out[False][2] < out[True][2] == out[True][1] + 1  # every token, and the end, masked in full


def test_grammar_end_ends_the_output(loaded) -> None:
    text, done, _ = asyncio.run(run(loaded, SamplingParams(max_tokens=50, temperature=1.0, seed=3, ignore_eos=True),
                                    GrammarSpec(gbnf='root ::= "yes" | "no"', prefix="answer: ")))
    assert done.finish_reason == "stop" and text in ("answer: yes", "answer: no")


def test_lazy_grammar_applies_from_its_trigger(loaded) -> None:
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    free, _, lps = asyncio.run(run(loaded, greedy))
    offset, trigger = 0, ""
    for i, lp in enumerate(lps):  # a whole token, not seen earlier in the text, becomes the trigger
        if i >= 3 and len(lp.token) >= 2 and lp.token.isprintable() and free.find(lp.token) == offset:
            trigger = lp.token
            break
        offset += len(lp.token)
    assert trigger, lps
    spec = GrammarSpec(json_schema=SCHEMA, prefix=trigger + "\n", triggers=(trigger,))
    text, done, _ = asyncio.run(run(loaded, SamplingParams(max_tokens=120, temperature=0), spec))
    head = free[:offset + len(trigger)]
    assert text.startswith(head + "\n") and done.finish_reason == "stop"
    Pet.model_validate_json(text[len(head) + 1:])
    # A trigger that ends inside the token the model wants next: that token would feed the grammar text it refuses
    # (llama.cpp throws, which aborts the process), so another is picked; the request finishes either way.
    short = trigger[:-1]
    spec = GrammarSpec(json_schema=SCHEMA, prefix=short + "\n", triggers=(short,))
    text, done, _ = asyncio.run(run(loaded, SamplingParams(max_tokens=60, temperature=0), spec))
    assert text.startswith(free[:offset]) and not text.startswith(head)
    # A trigger that is the start of the grammar's own text (a JSON call's '{"name"', no literal prefix) is taken;
    # one the grammar could not take from its start is refused before anything runs (llama.cpp would abort on it).
    call = {"type": "object", "properties": {"name": {"const": "f"}}, "required": ["name"]}
    compile_grammar(GrammarSpec(json_schema=call, triggers=('{"name"',)), loaded[1]).close()
    with pytest.raises(InvalidRequestError, match="cannot start with its trigger"):
        compile_grammar(GrammarSpec(json_schema=call, triggers=("<call>",)), loaded[1])


def test_logprobs_are_the_models_distribution(loaded) -> None:
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)

    async def main():
        batched = await asyncio.gather(*[run(loaded, p, prompt=f"{PROMPT} {i}") for i in range(3)])
        solo = await run(loaded, p, prompt=f"{PROMPT} 1")
        sampled = await run(loaded, SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True,
                                                   logprobs=2), GrammarSpec(json_schema=SCHEMA))
        return batched, solo, sampled

    batched, solo, sampled = asyncio.run(main())
    for text, done, lps in batched:
        assert len(lps) == done.usage.completion_tokens == 8
        assert "".join(lp.token for lp in lps) == text
        for lp in lps:
            assert len(lp.top) == 5 and lp.top[0].token == lp.token and lp.top[0].logprob == lp.logprob
            assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
            assert sum(math.exp(t.logprob) for t in lp.top) <= 1 + 1e-6 and bytes(lp.bytes).decode("utf-8", "replace")
    for a, b in zip(batched[1][2], solo[2], strict=True):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-3
    for lp in sampled[2]:  # constrained tokens may be unlikely ones: logprob <= 0, not necessarily the top
        assert lp.logprob <= 0 and len(lp.top) == 2


def test_logprobs_describe_the_returned_text_when_a_stop_string_cuts_it(loaded) -> None:
    free, _, lps = asyncio.run(run(loaded, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                          logprobs=0)))
    offset, k = 0, -1
    for i, lp in enumerate(lps[:-1]):  # a stop string from the start of token i into token i + 1
        stop = lp.token + lps[i + 1].token[:1]
        if i >= 3 and lp.token and lps[i + 1].token and free.find(stop) == offset:
            k = i
            break
        offset += len(lp.token)
    assert k > 0, lps
    stop = lps[k].token + lps[k + 1].token[:1]
    for stream in (True, False):
        p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0, stop=[stop])
        text, done, got = asyncio.run(run(loaded, p, stream=stream))
        assert text == free[:offset] and done.finish_reason == "stop"
        # Token k was held back as the start of the stop string, then cut: neither it nor token k + 1 is described.
        assert [lp.token for lp in got] == [lp.token for lp in lps[:k]] and "".join(lp.token for lp in got) == text


# ---- over HTTP and RunPod ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(llm_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_app}/v1", api_key="x")


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "name a pet"}]
    done = client.chat.completions.parse(model="", messages=msgs, response_format=Pet, max_tokens=150, temperature=0)
    assert isinstance(done.choices[0].message.parsed, Pet) and done.choices[0].finish_reason == "stop"
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    chunks = list(client.chat.completions.create(model="", messages=msgs, response_format=rf, max_tokens=150,
                                                 temperature=0.8, seed=5, stream=True))
    Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    obj = client.chat.completions.create(model="", messages=msgs, max_tokens=12, temperature=0,
                                         response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")
    comp = client.completions.create(model="", prompt="pet:", max_tokens=150, temperature=0,
                                     extra_body={"json_schema": SCHEMA})
    Pet.model_validate_json(comp.choices[0].text)
    yes = client.completions.create(model="", prompt="ok?", max_tokens=9, extra_body={"grammar": 'root ::= "yes"'})
    assert yes.choices[0].text == "yes" and yes.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}}, "response_format", "'minimum'"),
    ({"grammar": "root ::= nothing"}, "grammar", "does not parse"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"logprobs": False, "top_logprobs": 3}, None, "top_logprobs"),
])
def test_bad_constraint_is_a_400_before_any_slot(llm_app: str, body: dict, param: str | None, words: str) -> None:
    r = httpx.post(f"{llm_app}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and words in err["message"] and "Traceback" not in r.text
    if param:
        assert err["param"] == param
    assert httpx.get(f"{llm_app}/stats", timeout=10).json()["slots_busy"] == 0


def test_logprobs_in_openai_shapes(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob and c.bytes for c in content)
    streamed = [c for c in client.chat.completions.create(model="", messages=msgs, max_tokens=5, temperature=0,
                                                          logprobs=True, stream=True, extra_body={"ignore_eos": True})
                if c.choices and c.choices[0].logprobs]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == [c.token for c in content]
    comp = client.completions.create(model="", prompt="the quick", max_tokens=4, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0
    assert all(len(t) <= 2 for t in lp.top_logprobs) and "".join(lp.tokens) == comp.choices[0].text
    stream = list(client.completions.create(model="", prompt="the quick", max_tokens=4, temperature=0, logprobs=2,
                                            stream=True, extra_body={"ignore_eos": True}))
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
    plain = client.chat.completions.create(model="", messages=msgs, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_runpod_jobs_carry_the_same_fields() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    for raw in ({"openai_input": {"messages": [{"role": "user", "content": "x"}], "response_format": rf,
                                  "logprobs": True}},
                {"messages": [{"role": "user", "content": "x"}], "sampling_params": {"response_format": rf,
                                                                                   "logprobs": True}}):
        call = normalise(json.loads(json.dumps(raw)))
        p = ChatCompletionRequest.model_validate(call.body).to_sampling_params(8)
        assert p.grammar == GrammarSpec(json_schema=SCHEMA) and p.logprobs == 0
