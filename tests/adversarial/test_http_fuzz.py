"""A seeded fuzzer over real HTTP: hundreds of malformed bodies (wrong types, huge numbers, NaN/Infinity, truncated
JSON, invalid UTF-8, unknown roles, junk in every OpenAI field, wrong content types, empty bodies) against every
route get no 5xx; every error is a JSON 4xx in the OpenAI error shape; and the server answers a normal request
afterwards, also to the real ``openai`` client."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(240)

SEED = 20240611
N_BODIES = 560
MSG = [{"role": "user", "content": "hi"}]
TEMPLATES: dict[str, dict] = {
    "/v1/chat/completions": {"messages": MSG, "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [1, 2]},
}
GET_ROUTES = ["/v1/models", "/health", "/v1/health", "/ready", "/stats"]
OPENAI_FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "n", "stream", "stream_options",
    "ignore_eos", "user", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "echo", "suffix", "best_of", "content", "add_special", "tokens", "parallel_tool_calls", "metadata",
]
HUGE = [10**40, -(10**40), 2**63, 2**31, -(2**31) - 1, 2**64 + 1, 1e308, -1e308, 1e-320, 0, -1]


def junk(rng: random.Random, depth: int = 0) -> object:
    makers = [
        lambda: None, lambda: True, lambda: rng.choice(HUGE), lambda: math.nan, lambda: math.inf,
        lambda: -math.inf, lambda: rng.uniform(-5, 5), lambda: "",
        lambda: rng.choice(["x", "\u0000", "\ud800", "ü" * 50, "system", "<|im_end|>", "{{ 7*7 }}", "9" * 400]),
        lambda: [junk(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(["role", "content", "type", "text", "x"]): junk(rng, depth + 1)
                 for _ in range(rng.randrange(4))},
        lambda: [{"role": rng.choice(["user", "wizard", "", "assistant", "tool", None]),
                  "content": junk(rng, depth + 1)}],
        lambda: [{"type": rng.choice(["text", "image_url", 3]), "text": junk(rng, depth + 1)}],
    ]
    return rng.choice(makers if depth < 3 else makers[:9])()


def encode(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def bodies(rng: random.Random) -> Iterator[tuple[str, str, bytes, str | None]]:
    """(method, path, raw body, content-type) triples; each body is broken in some way, or odd but valid."""
    routes = list(TEMPLATES)
    while True:
        path = rng.choice(routes)
        base = dict(TEMPLATES[path])
        kind = rng.randrange(12)
        ctype: str | None = "application/json"
        if kind == 0:  # one OpenAI field set to junk
            base[rng.choice(OPENAI_FIELDS)] = junk(rng)
            raw = encode(base)
        elif kind == 1:  # several fields at once
            for _ in range(rng.randrange(2, 6)):
                base[rng.choice(OPENAI_FIELDS)] = junk(rng)
            raw = encode(base)
        elif kind == 2:  # truncated JSON
            full = encode({**base, "stop": ["x"], "user": "u" * rng.randrange(50)})
            raw = full[: rng.randrange(len(full))]
        elif kind == 3:  # invalid UTF-8 spliced in
            full = encode(base)
            at = rng.randrange(len(full))
            raw = full[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8"]) + full[at:]
        elif kind == 4:  # not an object at all
            raw = encode(junk(rng))
        elif kind == 5:  # empty bodies, whitespace, nulls
            raw = rng.choice([b"", b" ", b"\n\t", b"null", b"{}", b"[]", b'""', b"0"])
        elif kind == 6:  # wrong content type (the body may still be JSON)
            raw = encode(base) if rng.random() < 0.5 else b"a=1&b=2"
            ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                "application/json; charset=latin-1", None])
        elif kind == 7:  # NaN / Infinity literals in numeric fields
            base[rng.choice(["temperature", "top_p", "max_tokens", "seed", "top_k", "min_p"])] = rng.choice(
                [math.nan, math.inf, -math.inf])
            raw = encode(base)
        elif kind == 8:  # huge or edge numbers in numeric fields
            base[rng.choice(["max_tokens", "seed", "top_k", "temperature", "n", "max_completion_tokens",
                             "presence_penalty", "repeat_penalty"])] = rng.choice(HUGE)
            base["max_tokens"] = base.get("max_tokens", 2) if rng.random() < 0.7 else 2
            raw = encode(base)
        elif kind == 9:  # unknown roles and odd message shapes
            base["messages"] = [{"role": rng.choice(["wizard", "", "USER", "function", None, 7]),
                                 "content": junk(rng)} for _ in range(rng.randrange(1, 3))]
            raw = encode(base)
        elif kind == 10:  # odd strings where text goes: lone surrogates, NULs, control and template syntax
            odd = rng.choice(["\ud800", "a\udfffb", "\u0000", "\x1b[2J", "{% raw %}", "\ufeff", "x" * 3000])
            field = rng.choice(["model", "user", "stop", "prompt", "content", "messages", "suffix"])
            base[field] = [{"role": "user", "content": odd}] if field == "messages" else odd
            raw = encode(base)
        else:  # duplicated keys, deep-ish nesting, stray bytes after the object
            raw = rng.choice([encode(base) + b"}", encode(base) + b" trailing", b'{"a":1,"a":2}',
                              b'{"prompt":' + b"[" * 70 + b"]" * 70 + b"}", encode(base)[:-1] + b',}'])
        yield "POST", path, raw, ctype


def check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), f"{what}: {r.headers}"
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, f"{what}: {err}"
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"], what
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "internal_error" not in r.text and r.text.rstrip().endswith("data: [DONE]"), f"{what}: {r.text[-300:]}"


def test_fuzzed_bodies_never_get_a_5xx(llm_app: str) -> None:
    rng = random.Random(SEED)
    gen = bodies(rng)
    sent = 0
    seen: dict[int, int] = {}
    with httpx.Client(base_url=llm_app, timeout=60) as c:
        while sent < N_BODIES:
            method, path, raw, ctype = next(gen)
            headers = {"content-type": ctype} if ctype else {}
            r = c.request(method, path, content=raw, headers=headers)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            check(r, f"{path} {raw[:200]!r}")
            sent += 1
            if sent % 20 == 0:  # the read-only routes, with junk bodies, methods and queries
                for p in GET_ROUTES:
                    check(c.get(p, params={"x": raw[:50].decode("latin-1")}), f"GET {p}")
                    check(c.post(p, content=raw), f"POST {p}")
                check(c.request("PUT", rng.choice(list(TEMPLATES)), content=raw), "PUT")
                check(c.get(f"/v1/{raw[:20].hex()}"), "unknown route")
        ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    assert len(seen) > 2 and seen.get(200, 0) > 20, seen  # the bodies reach validation and beyond
    client = openai.OpenAI(base_url=f"{llm_app}/v1", api_key="x")
    chat = client.chat.completions.create(model="", messages=MSG, max_tokens=3)
    assert chat.choices[0].message.content is not None
