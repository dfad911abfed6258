"""Grammar compilation: a ``GrammarSpec`` becomes GBNF that llama.cpp accepts (prefix, suffix, repeat and lazy
triggers wrapped around the schema's root), each spec is converted once (bounded cache, refusals cached too), and
every spec that cannot be enforced is refused with an ``InvalidRequestError`` naming the problem; the wire fields
(``response_format``, ``grammar``, ``json_schema``, ``logprobs``) become that spec, and logprobs take OpenAI's two
shapes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.engine.gbnf import _Cache, nesting, rename_rule, spec_to_text, trigger_pattern
from serve_app.engine.grammar import compile_grammar
from serve_app.engine.lazy import TriggerWatch
from serve_app.engine.utf8mask import Utf8Table
from serve_app.errors import InvalidRequestError
from serve_app.ingress.logprobs import chat_logprobs, completion_logprobs
from serve_app.protocol import GrammarSpec, TokenLogprob
from serve_app.schemas import ChatCompletionRequest, CompletionRequest
from tests.support.gguf_factory import ModelSpec, write_gguf

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory):
    from serve_app.engine import LlamaModelHandle

    path = write_gguf(Path(tmp_path_factory.mktemp("g")) / "v.gguf", ModelSpec())
    m = LlamaModelHandle(str(path), 0, False, vocab_only=True)
    yield m
    m.close()


def test_schema_becomes_gbnf_that_llama_cpp_accepts(vocab) -> None:
    for spec in (GrammarSpec(json_schema=SCHEMA), GrammarSpec(json_schema={}), GrammarSpec(json_schema={"type": "object"}),
                 GrammarSpec(json_schema=SCHEMA, prefix='<tool_call>\n{"x": ', suffix="}\n</tool_call>", repeat=True),
                 GrammarSpec(json_schema=SCHEMA, prefix="<tool_call>", triggers=("<tool_call>",)),
                 GrammarSpec(gbnf='root ::= "yes" | "no" | root-x\nroot-x ::= "[root]"', prefix="A", suffix="B")):
        g = compile_grammar(spec, vocab)
        assert g.lazy == bool(spec.triggers)
        g.close()
        g.close()  # idempotent


def test_wrapping_renames_only_the_root_rule() -> None:
    text = spec_to_text(GrammarSpec(gbnf='root ::= "root" rootx # root\nrootx ::= [root] root', prefix='"',
                                    suffix="\n")).gbnf
    assert text.splitlines()[0] == 'root ::= "\\"" wrapped-root "\\n"'
    assert 'wrapped-root ::= "root" rootx # root' in text and "rootx ::= [root] wrapped-root" in text
    assert rename_rule('a ::= "a" a-b a', "a", "z") == 'z ::= "a" a-b z'
    rep = spec_to_text(GrammarSpec(json_schema=SCHEMA, prefix="<c>", repeat=True)).gbnf
    assert rep.startswith("root ::= wrapped-block ([ \\t\\n]{0,4} wrapped-block)*")


def test_control_characters_are_excluded_from_json_strings() -> None:
    text = spec_to_text(GrammarSpec(json_schema=SCHEMA)).gbnf
    char = next(line for line in text.splitlines() if line.startswith("char ::= "))
    assert "\\x00-\\x1F" in char


def test_trigger_pattern_escapes_literal_text() -> None:
    pat = trigger_pattern(("[TOOL_CALLS]", "a.b", "<tool_call>"))
    assert pat == r"[\s\S]*?(\[TOOL_CALLS\]|a\.b|<tool_call>)[\s\S]*"
    m = re.fullmatch(pat, "hello a.b {")  # the same regex in Python's dialect: the group starts at the trigger
    assert m is not None and m.start(1) == 6
    assert re.fullmatch(pat, "hello axb {") is None


@pytest.mark.parametrize(("spec", "words"), [
    (GrammarSpec(json_schema={"type": "integer", "minimum": 3}), "'minimum'"),
    (GrammarSpec(json_schema={"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}),
     "'uniqueItems'"),
    (GrammarSpec(json_schema={"type": "wat"}), "Unrecognized schema"),
    (GrammarSpec(json_schema={"$ref": "https://example.com/s.json"}), "remote '$ref'"),
    (GrammarSpec(json_schema={"type": "string", "pattern": "^a+$", "maxLength": 3}), "'pattern'"),
    (GrammarSpec(json_schema={"properties": []}), "cannot be used"),
    (GrammarSpec(json_schema={"enum": ["x" * 70_000]}), "larger than"),
    (GrammarSpec(gbnf="root ::= " + "(" * 100 + '"a"' + ")" * 100), "nests groups"),
])
def test_unenforceable_specs_are_refused_by_name(spec: GrammarSpec, words: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        spec_to_text(spec)
    assert words in e.value.message
    assert e.value.param == ("grammar" if spec.gbnf else "response_format")


def test_a_property_named_like_a_keyword_is_fine() -> None:
    spec_to_text(GrammarSpec(json_schema={"type": "object", "properties": {"minimum": {"type": "integer"}}}))


@pytest.mark.parametrize("gbnf", ["root ::= foo", 'x ::= "a"', "root ::= root \"a\"", "root ::= (\"a\""])
def test_llama_cpp_refusal_is_a_400(vocab, gbnf: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        compile_grammar(GrammarSpec(gbnf=gbnf), vocab)
    assert "does not parse" in e.value.message and e.value.param == "grammar"


def test_cache_converts_once_and_stays_bounded() -> None:
    c = _Cache(2)
    a, b, bad = GrammarSpec(json_schema=SCHEMA), GrammarSpec(gbnf='root ::= "b"'), GrammarSpec(json_schema={"type": 1})
    assert c.get(a) is c.get(GrammarSpec(json_schema=dict(SCHEMA)))
    assert (c.hits, c.misses) == (1, 1)
    c.get(b)
    for _ in range(2):
        with pytest.raises(InvalidRequestError):
            c.get(bad)
    assert (c.hits, c.misses, len(c)) == (2, 3, 2)  # the refusal was cached; ``a`` was evicted
    c.get(a)
    assert c.misses == 4
    assert nesting('root ::= (("(" x) [(]) # (((') == 2


def test_wire_fields_become_one_spec() -> None:
    chat = {"messages": [{"role": "user", "content": "x"}]}
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    p = ChatCompletionRequest.model_validate({**chat, "response_format": rf, "logprobs": True,
                                              "top_logprobs": 3}).to_sampling_params(16)
    assert p.grammar == GrammarSpec(json_schema=SCHEMA) and p.logprobs == 3
    p = ChatCompletionRequest.model_validate({**chat, "response_format": {"type": "json_object"}}).to_sampling_params(1)
    assert p.grammar == GrammarSpec(json_schema={"type": "object"}) and p.logprobs is None
    p = ChatCompletionRequest.model_validate({**chat, "response_format": {"type": "text"}}).to_sampling_params(1)
    assert p.grammar is None
    p = CompletionRequest.model_validate({"prompt": "x", "grammar": 'root ::= "a"', "logprobs": 0}).to_sampling_params(1)
    assert p.grammar == GrammarSpec(gbnf='root ::= "a"') and p.logprobs == 0
    p = CompletionRequest.model_validate({"prompt": "x", "json_schema": SCHEMA}).to_sampling_params(1)
    assert p.grammar == GrammarSpec(json_schema=SCHEMA)
    for bad in ({**chat, "grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
                {**chat, "response_format": {"type": "json_schema"}}, {**chat, "top_logprobs": 2},
                {**chat, "logprobs": True, "top_logprobs": 21}, {**chat, "response_format": {"type": "xml"}}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(bad)


def test_logprob_shapes() -> None:
    lps = [TokenLogprob("ab", [97, 98], -0.5, [TokenLogprob("ab", [97, 98], -0.5), TokenLogprob("c", [99], -1.5)]),
           TokenLogprob("é", [195, 169], -0.1, [])]
    chat = chat_logprobs(lps)
    assert chat is not None and chat["content"][0] == {
        "token": "ab", "logprob": -0.5, "bytes": [97, 98],
        "top_logprobs": [{"token": "ab", "logprob": -0.5, "bytes": [97, 98]},
                         {"token": "c", "logprob": -1.5, "bytes": [99]}]}
    comp = completion_logprobs(lps, offset=4)
    assert comp == {"tokens": ["ab", "é"], "token_logprobs": [-0.5, -0.1],
                    "top_logprobs": [{"ab": -0.5, "c": -1.5}, {}], "text_offset": [4, 6]}
    assert chat_logprobs(None) is None and completion_logprobs(None) is None


def test_trigger_watch_refuses_tokens_that_run_past_the_prefix() -> None:
    pieces = {0: b"say ", 1: b"<tool", 2: b"_call>", 3: b"_call>{", 4: b"_call>\n", 5: b"<tool_call>\n{x"}
    w = TriggerWatch(("<tool_call>",), "<tool_call>\n", pieces.__getitem__)
    w.push(0)
    assert not w.completes_badly(1)
    w.push(1)
    assert [w.completes_badly(t) for t in (2, 3, 4, 5)] == [False, True, False, True]
    assert not w.fired and len(w.tail) <= len("<tool_call>") - 1
    w.push(4)
    assert w.fired


def test_trigger_that_starts_the_grammars_own_text_must_end_with_its_token() -> None:
    # A JSON call's trigger ('{"name"') with no literal prefix: the token completing it may not run past it.
    pieces = {0: b"ok ", 1: b'{"', 2: b'name"', 3: b'name":', 4: b'{"name"'}
    w = TriggerWatch(('{"name"',), "", pieces.__getitem__)
    w.push(0)
    assert [w.completes_badly(t) for t in (1, 4)] == [False, False]
    w.push(1)
    assert [w.completes_badly(t) for t in (2, 3)] == [False, True]


def test_utf8_table_matches_pythons_decoder() -> None:
    pieces = [b"a", b"\xc3", b"\xa9", b"\xf4\x9b", b"\xf4\x8f", b"\xbf\xbf", b"\xed\xa0", b"\xe2\x82\xac", b"\xff"]
    t = Utf8Table(len(pieces), pieces.__getitem__)
    for seq in ([1, 2], [1, 0], [3], [4, 5], [6], [7, 0], [8], [2], [1, 1]):
        state, ok = 0, True
        for tok in seq:
            ok = ok and t.ok(state, tok)
            state = t.next(state, tok)
        try:
            b"".join(pieces[i] for i in seq).decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        assert ok == valid and (state == 0 or not valid), seq
