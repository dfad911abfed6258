"""Reading a request body stays linear in its size and holds the size limit while the body arrives, and the JSON
checks (depth, lone surrogates, NaN) refuse hostile values with a typed 400 without recursing on them. In-process,
on the ingress's own body reader: chunk sizes over real HTTP are the network's to choose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from serve_app.errors import InvalidRequestError, RequestTooLargeError
from serve_app.ingress.body import parse_json, read_body
from serve_app.jsonsafe import MAX_DEPTH, check_json


async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
    piece = b"a" * size
    for _ in range(n):
        yield piece


def read(n: int, size: int, limit: int) -> bytes:
    return asyncio.run(read_body(chunks(n, size), limit))


def test_many_small_chunks_are_read_in_linear_time() -> None:
    # 8 MiB in 1 KiB chunks: joined once this takes milliseconds; re-concatenated per chunk it copies ~32 GiB.
    t0 = time.perf_counter()
    body = read(8192, 1024, 16 * 1024 * 1024)
    elapsed = time.perf_counter() - t0
    assert len(body) == 8 * 1024 * 1024
    assert elapsed < 2.0, f"{elapsed:.2f} s to read 8 MiB in 1 KiB chunks"


def test_the_limit_holds_while_reading() -> None:
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal consumed
        while True:
            consumed += 1
            yield b"x" * 1024

    with pytest.raises(RequestTooLargeError):
        asyncio.run(read_body(endless(), 64 * 1024))
    assert consumed == 65  # stopped at the first chunk over the limit


def test_depth_is_bounded_without_recursion() -> None:
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(ok.encode()) is not None
    for raw in ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "[" * 200_000, '{"a":' * 900 + "1" + "}" * 900):
        with pytest.raises(InvalidRequestError, match="nested too deeply"):
            parse_json(raw.encode())
    deep: object = 1
    for _ in range(100_000):  # a value built in memory (the RunPod path): checked iteratively too
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        check_json(deep, root="body")


@pytest.mark.parametrize("raw", [b'{"a":"\\ud800"}', b'{"\\udc00":1}', b'["ok", ["x\\udfffy"]]'])
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="surrogate"):
        parse_json(raw)


def test_paired_surrogates_and_plain_unicode_pass() -> None:
    assert parse_json('{"a":"\\ud83d\\ude00 é 中"}'.encode()) == {"a": "\U0001f600 é 中"}


@pytest.mark.parametrize("raw", [b'{"t":NaN}', b'{"t":Infinity}', b'{"t":-Infinity}', b"{", b"\xff", b'{"a":1}x'])
def test_not_json_is_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        parse_json(raw)
