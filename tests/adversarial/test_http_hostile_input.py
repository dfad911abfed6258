"""Hostile bytes at the HTTP edge get a 400/413 OpenAI-style JSON error on every route, never a 5xx, and leave the
server serving: lone UTF-16 surrogates, JSON nested far deeper than any OpenAI body, chunked bodies over the size
limit, and an ``X-Request-Id`` that is too long or carries odd characters (replaced by a fresh id before it is
echoed in headers and response ids)."""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = pytest.mark.timeout(240)

MSG = [{"role": "user", "content": "hello"}]
BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
LONE = '"\\ud800"'  # a JSON escape that decodes to a lone surrogate: valid JSON, not valid Unicode


def lone(template: str) -> str:
    return template.replace("@", LONE)


def post_raw(base: str, path: str, raw: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{base}{path}", content=raw, headers={"content-type": "application/json", **headers},
                      timeout=60)


def assert_json_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert "Traceback" not in r.text
    return err


def assert_still_serves(base: str) -> None:
    ok = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200, ok.text


SURROGATE_BODIES = [
    ("chat content", "/v1/chat/completions", '{"messages":[{"role":"user","content":@}],"max_tokens":2}'),
    ("chat content part", "/v1/chat/completions",
     '{"messages":[{"role":"user","content":[{"type":"text","text":@}]}],"max_tokens":2}'),
    ("chat model", "/v1/chat/completions", '{"model":@,"messages":[{"role":"user","content":"x"}]}'),
    ("chat stop", "/v1/chat/completions", '{"messages":[{"role":"user","content":"x"}],"stop":[@]}'),
    ("chat unknown field key", "/v1/chat/completions",
     '{"messages":[{"role":"user","content":"x"}],"max_tokens":2,"\\udfff":1}'),
    ("completion prompt", "/v1/completions", '{"prompt":@,"max_tokens":2}'),
    ("completion model", "/v1/completions", '{"model":@,"prompt":"x","max_tokens":2}'),
    ("completion stream", "/v1/completions", '{"prompt":"a\\udc80b","max_tokens":2,"stream":true}'),
    ("tokenize content", "/tokenize", '{"content":@}'),
    ("tokenize messages", "/tokenize", '{"messages":[{"role":"user","content":@}]}'),
    ("detokenize junk", "/detokenize", '{"tokens":[1],"x":@}'),
]


@pytest.mark.parametrize(("name", "path", "raw"), SURROGATE_BODIES, ids=[s[0] for s in SURROGATE_BODIES])
def test_lone_surrogate_is_a_400_on_every_route(llm_app: str, name: str, path: str, raw: str) -> None:
    err = assert_json_error(post_raw(llm_app, path, lone(raw).encode()), 400)
    assert err["code"] == "invalid_request" and "surrogate" in err["message"]
    assert_still_serves(llm_app)


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_deeply_nested_json_is_a_400(llm_app: str, path: str) -> None:
    for raw in (b"[" * 100_000, b'{"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                b'{"prompt":"x","max_tokens":2,"logit_bias":' + b'{"a":' * 300 + b"1" + b"}" * 301):
        err = assert_json_error(post_raw(llm_app, path, raw), 400)
        assert err["code"] == "invalid_request" and "nest" in err["message"], err
    assert_still_serves(llm_app)


def test_nesting_an_openai_body_needs_is_accepted(llm_app: str) -> None:
    schema: dict = {"type": "string"}
    for _ in range(10):  # tools and response_format carry JSON schemas: a real one nests this deep
        schema = {"type": "object", "properties": {"x": schema}}
    r = httpx.post(f"{llm_app}/v1/chat/completions", timeout=60, json={
        "messages": MSG, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": schema}})
    assert r.status_code == 200, r.text


def test_chunked_body_over_the_limit_is_a_413(llm_app: str) -> None:
    """No content-length: the limit must hold while the body is read. A raw socket sends 64 KiB chunks and reads
    whatever the server answers; the answer must be a JSON 413, whether it comes before the body ends or after."""
    url = urlsplit(llm_app)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(head + chunk(b'{"prompt":"'))
        try:
            for _ in range(160):  # 10 MiB, over the 4 MiB default
                s.sendall(chunk(b"a" * (64 * 1024)))
            s.sendall(chunk(b'"}') + b"0\r\n\r\n")
        except OSError:  # the server answered and closed before the whole body was written: read its answer
            pass
        reply = b""
        while chunk_in := s.recv(65536):
            reply += chunk_in
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"413", reply[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"application/json" in headers.lower(), headers
    assert b'"request_too_large"' in body, body[:300]
    assert_still_serves(llm_app)


def test_empty_body_is_a_400(llm_app: str) -> None:
    for path in BODY_ROUTES:
        assert_json_error(post_raw(llm_app, path, b""), 400)


HEX_ID = re.compile(r"[0-9a-f]{32}")


def fresh_id(r: httpx.Response) -> str:
    # Serve's HTTP proxy echoes the header it received by itself; ours is the replacement beside it.
    ours = [v for v in r.headers.get_list("x-request-id") if HEX_ID.fullmatch(v)]
    assert len(ours) == 1, r.headers.get_list("x-request-id")
    return ours[0]


@pytest.mark.parametrize("given", ["x" * 5000, "evil id<script>", "id\u00e9\u00e8", "a;b=c", "a/../b"])
def test_unacceptable_request_id_is_replaced(llm_app: str, given: str) -> None:
    headers = {"X-Request-Id": given.encode()}  # type: ignore[dict-item]
    r = httpx.post(f"{llm_app}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}, headers=headers,
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"chatcmpl-{fresh_id(r)}"
    bad = httpx.post(f"{llm_app}/v1/chat/completions", json={"messages": []}, headers=headers, timeout=60)
    assert bad.status_code == 400 and fresh_id(bad)


def test_acceptable_request_id_is_echoed(llm_app: str) -> None:
    rid = "client-7f3a.b2:9_Z"
    r = httpx.post(f"{llm_app}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"X-Request-Id": rid}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == f"cmpl-{rid}"
    assert r.headers.get_list("x-request-id") == [rid]  # echoed once (by Serve's proxy), not twice
