"""The HTTP ingress speaks OpenAI to the real ``openai`` client (sync, async, streaming), answers every bad request
with a 4xx OpenAI-style JSON error and keeps serving, enforces API keys and the queue bound, never executes a
malicious chat template from a GGUF, and frees the slot when a streaming client disconnects."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from serve_app.builder import build_app
from tests.conftest import wait_ready
from tests.support.gguf_factory import ModelSpec, write_gguf

pytestmark = pytest.mark.timeout(240)

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def model_id(llm_app: str) -> str:
    return httpx.get(f"{llm_app}/v1/models").json()["data"][0]["id"]


def test_openai_sync_chat_and_completion(llm_app: str, model_id: str) -> None:
    client = openai.OpenAI(base_url=f"{llm_app}/v1", api_key="x")
    chat = client.chat.completions.create(model=model_id, messages=MSG, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens == 6
    assert chat.model_extra["timings"]["predicted_n"] == 6
    comp = client.completions.create(model=model_id, prompt="the quick brown", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 5
    # content as a list of text parts, and a missing model, are accepted
    parts = client.chat.completions.create(model="", messages=[{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}], max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True})
    assert parts.choices[0].message.content == chat.choices[0].message.content


def test_openai_streaming_with_usage(llm_app: str, model_id: str) -> None:
    client = openai.OpenAI(base_url=f"{llm_app}/v1", api_key="x")
    full = client.chat.completions.create(model=model_id, messages=MSG, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=model_id, messages=MSG, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_raw_sse_ends_with_done(llm_app: str, model_id: str) -> None:
    with httpx.stream("POST", f"{llm_app}/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True,
                                                                  "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_openai_async_concurrent(llm_app: str, model_id: str) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{llm_app}/v1", api_key="x")
        outs = await asyncio.gather(*[client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": f"count {i}"}], max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True}) for i in range(6)])
        await client.close()
        return [o.choices[0].message.content or "" for o in outs]

    outs = asyncio.run(main())
    assert len(outs) == 6 and all(outs)


BAD = [
    ("invalid json", "/v1/chat/completions", b"{not json", 400, "invalid_request"),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_request"),
    ("messages missing", "/v1/chat/completions", {"max_tokens": 3}, 400, "invalid_request"),
    ("messages empty", "/v1/chat/completions", {"messages": []}, 400, "invalid_request"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
    ("wrong type", "/v1/chat/completions", {"messages": MSG, "max_tokens": "many"}, 400, "invalid_request"),
    ("temperature out of range", "/v1/chat/completions", {"messages": MSG, "temperature": 9}, 400,
     "invalid_request"),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_request"),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 3}, 400, "invalid_request"),
    ("empty stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "invalid_request"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": MSG}, 404, "model_not_found"),
    ("prompt over context", "/v1/completions", {"prompt": "word " * 2000}, 400, "context_length_exceeded"),
    ("token ids outside vocab", "/v1/completions", {"prompt": [1, 999999]}, 400, "context_length_exceeded"),
    ("body too large", "/v1/chat/completions", b"{" + b" " * (5 * 1024 * 1024) + b"}", 413, "request_too_large"),
    ("unknown route", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "/v1/models", None, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error(llm_app: str, name: str, path: str, body: object, status: int,
                                       code: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{llm_app}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert "Traceback" not in r.text and "/work" not in r.text
    # ... and the server still serves
    ok = httpx.post(f"{llm_app}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_unknown_fields_are_accepted(llm_app: str) -> None:
    r = httpx.post(f"{llm_app}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "logit_bias": {},
                                                            "parallel_tool_calls": False, "frobnicate": 1})
    assert r.status_code == 200


def test_tokenize_detokenize_roundtrip(llm_app: str) -> None:
    toks = httpx.post(f"{llm_app}/tokenize", json={"content": "hello world", "add_special": False}).json()["tokens"]
    assert toks and httpx.post(f"{llm_app}/detokenize", json={"tokens": toks}).json()["content"] == " hello world"
    chat_toks = httpx.post(f"{llm_app}/tokenize", json={"messages": MSG}).json()["tokens"]
    assert len(chat_toks) > len(toks)
    r = httpx.post(f"{llm_app}/detokenize", json={"tokens": [-5]})
    assert r.status_code == 400


def test_client_disconnect_frees_the_slot(llm_app: str) -> None:
    with httpx.stream("POST", f"{llm_app}/v1/completions", json={
            "prompt": "a long one", "max_tokens": 400, "stream": True, "ignore_eos": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream: closing the response drops the connection
    deadline = time.time() + 10
    while time.time() < deadline:
        st = httpx.get(f"{llm_app}/stats").json()
        if st["slots_busy"] == 0 and st["kv_cells_used"] == 0:
            break
        time.sleep(0.05)
    assert st["slots_busy"] == 0 and st["kv_cells_used"] == 0, st
    assert st["tokens_generated"] < 10_000


EVIL = "{{ cycler.__init__.__globals__.os.system('touch /tmp/gguf-serve-pwned') }}{{ messages[0]['content'] }}"


@pytest.fixture(scope="module")
def guarded_app(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second app: a local GGUF whose chat template is malicious, API keys on, one slot and a queue of one."""
    d = tmp_path_factory.mktemp("evil")
    path = write_gguf(d / "evil.gguf", ModelSpec(chat_template=EVIL, name="evil"))
    args = {"model": {"filename": str(path)}, "cache_dir": str(d / "volume"), "accelerator": "cpu",
            "engine": {"n_parallel": 1, "n_ctx_per_slot": 512, "max_queued_requests": 1},
            "server": {"api_keys": ["sk-test-1", "sk-test-2"], "served_model_name": "evil"}}
    serve.run(build_app(args), name="guarded", route_prefix="/guarded")
    base = f"{ray_session}/guarded"
    wait_ready(base)
    yield base
    serve.delete("guarded")


def test_malicious_template_does_not_execute(guarded_app: str) -> None:
    marker = Path("/tmp/gguf-serve-pwned")
    marker.unlink(missing_ok=True)
    r = httpx.post(f"{guarded_app}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2},
                   headers={"Authorization": "Bearer sk-test-2"})
    assert r.status_code == 400 and "unsafe" in r.json()["error"]["message"]
    assert not marker.exists()


def test_api_keys(guarded_app: str) -> None:
    assert httpx.get(f"{guarded_app}/health").status_code == 200  # health stays open
    assert httpx.get(f"{guarded_app}/ready").status_code == 200
    r = httpx.get(f"{guarded_app}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded_app}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = httpx.get(f"{guarded_app}/v1/models", headers={"Authorization": "Bearer sk-test-1"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "evil"


def test_queue_limit_returns_429(guarded_app: str) -> None:
    headers = {"Authorization": "Bearer sk-test-1"}
    body = {"prompt": "the quick brown fox", "max_tokens": 300, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=headers) as c:
            return await asyncio.gather(*[c.post(f"{guarded_app}/v1/completions", json=body) for _ in range(4)])

    codes = sorted(r.status_code for r in asyncio.run(main()))
    assert codes.count(200) >= 2 and 429 in codes, codes
    limited = next(r for r in asyncio.run(main()) if r.status_code == 429) if 429 in codes else None
    assert limited is None or limited.headers.get("retry-after")


def test_second_turn_reports_cached_prompt_tokens(llm_app: str, model_id: str) -> None:
    """Prompt caching over HTTP: a conversation's next turn reuses the previous one (OpenAI's
    usage.prompt_tokens_details.cached_tokens, in a response and in a stream's usage chunk; llama-server's
    timings.cache_n), ``cache_prompt: false`` reuses nothing, and /stats shows the idle slots' caches."""
    client = openai.OpenAI(base_url=f"{llm_app}/v1", api_key="x")
    turn1 = [{"role": "system", "content": "you answer briefly about the lazy dog and the quick fox " * 4},
             {"role": "user", "content": "hello cache"}]
    first = client.chat.completions.create(model=model_id, messages=turn1, max_tokens=4, temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content or ""},
             {"role": "user", "content": "and again"}]
    chunks = list(client.chat.completions.create(model=model_id, messages=turn2, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert cached >= 0.5 * first.usage.prompt_tokens, chunks[-1].usage
    again = client.chat.completions.create(model=model_id, messages=turn2, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.model_extra["timings"]["cache_n"] == again.usage.prompt_tokens - 1
    off = client.chat.completions.create(model=model_id, messages=turn2, max_tokens=4, temperature=0,
                                         extra_body={"cache_prompt": False})
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    st = httpx.get(f"{llm_app}/stats").json()
    assert st["tokens_cached"] > 0 and st["kv_cells_cached"] > 0
    assert max(s["cached_tokens"] for s in st["slots"]) >= again.usage.prompt_tokens - 1
