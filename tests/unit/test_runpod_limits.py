"""Invariants: the RunPod job input is checked before any other work: over the size limit it is
``request_too_large``; nested deeper than ``MAX_DEPTH``, or holding a lone UTF-16 surrogate (in a value or a key)
or NaN/Infinity, it is ``invalid_request`` naming where, and no such check recurses (an input nested 100000 deep
is refused, not a RecursionError). An error item's ``str`` is its JSON (what RunPod's SDK puts in a FAILED job).
The worker reads its environment only through ``Settings``: a bad value is one readable line naming the variable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from serve_app.errors import InvalidRequestError, RequestTooLargeError
from serve_app.jsonsafe import MAX_DEPTH, check_json
from serve_app.runpod.handler import error_output
from serve_app.runpod.input import DEFAULT_MAX_INPUT_BYTES, normalise

MSGS = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_the_default_limit_is_the_settings_default() -> None:
    assert DEFAULT_MAX_INPUT_BYTES == 4 * 1024 * 1024


@pytest.mark.parametrize("job", [
    {"prompt": "x" * 5000},
    {"messages": [{"role": "user", "content": "é" * 2600}]},  # 2 bytes each in UTF-8
    {"openai_input": {"messages": MSGS, "logit_bias": {str(i): 1 for i in range(1000)}}},
    {"prompt": list(range(2000))},
])
def test_over_the_limit_is_request_too_large(job: dict[str, Any]) -> None:
    with pytest.raises(RequestTooLargeError, match="over 4096 bytes") as ei:
        normalise(job, max_bytes=4096)
    assert ei.value.to_dict()["code"] == "request_too_large" and ei.value.status == 413


def test_under_the_limit_passes_and_the_estimate_is_close_to_the_json_size() -> None:
    job = {"openai_input": {"messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": 8,
                            "temperature": 0.5, "stop": ["\n"], "stream": False}}
    size = len(json.dumps(job, separators=(",", ":")).encode())
    check_json(job, root="input", max_bytes=size + 8)
    with pytest.raises(RequestTooLargeError):
        check_json(job, root="input", max_bytes=size - 16)


def test_a_wide_input_stops_early() -> None:
    with pytest.raises(RequestTooLargeError):
        check_json({"prompt": [0] * 5_000_000}, root="input", max_bytes=4096)


@pytest.mark.parametrize(("job", "param"), [
    ({"messages": [{"role": "user", "content": "a \ud800 b"}]}, "messages.0.content"),
    ({"openai_input": {"model": "\udfff", "messages": MSGS}}, "openai_input.model"),
    ({"openai_input": {"messages": [{"role": "user", "\ud83d": 1}]}}, "openai_input.messages.0.\\ud83d"),
    ({"openai_route": "ok \udfff", "openai_input": {"messages": MSGS}}, "openai_route"),
    ("\ud800", "input"),
])
def test_a_lone_surrogate_is_invalid_and_never_echoed(job: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError, match="lone UTF-16 surrogate") as ei:
        normalise(job)
    assert ei.value.param == param
    json.dumps(ei.value.to_dict(), ensure_ascii=False).encode("utf-8")  # the error itself encodes


def test_a_valid_surrogate_pair_is_fine() -> None:
    assert normalise({"messages": [{"role": "user", "content": "\U0001f600 ok"}]}).body is not None


@pytest.mark.parametrize("depth", [MAX_DEPTH, 950, 100_000])
def test_deep_nesting_is_invalid_without_recursion(depth: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"nested more than {MAX_DEPTH} levels") as ei:
        normalise({"openai_input": {"messages": MSGS, "metadata": nested(depth)}})
    assert ei.value.param is not None and ei.value.param.startswith("openai_input.metadata")


def test_ordinary_nesting_is_fine() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "array"}}}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert normalise({"openai_input": {"messages": MSGS, "tools": tools, "metadata": nested(20)}}).body


@pytest.mark.parametrize(("value", "literal"), [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                                (float("-inf"), "-Infinity")])
def test_nan_and_infinity_are_not_json_numbers(value: float, literal: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"{literal} is not a JSON number") as ei:
        normalise({"prompt": "x", "sampling_params": {"temperature": value}})
    assert ei.value.param == "sampling_params.temperature"


def test_huge_integers_are_sized_without_str() -> None:
    check_json({"prompt": "x", "sampling_params": {"seed": 10**4000}}, root="input", max_bytes=8192)
    with pytest.raises(RequestTooLargeError):
        check_json({"prompt": "x", "sampling_params": {"seed": 10**4000}}, root="input", max_bytes=2048)


def test_an_error_item_prints_as_json() -> None:
    item = error_output(InvalidRequestError("bad 'x'", param="x"))
    assert json.loads(str(item["error"])) == {"message": "bad 'x'", "type": "invalid_request_error", "param": "x",
                                              "code": "invalid_request"}
    assert item["error"] == json.loads(str(item["error"]))  # still a plain object to JSON encoders
    body = {"message": "model 'm' not found", "type": "invalid_request_error", "param": "model",
            "code": "model_not_found"}
    assert json.loads(str(error_output(body)["error"])) == body


def run_worker(**env: str) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GGUF_SERVE_", "RAY_ADDRESS"))}
    return subprocess.run([sys.executable, "-m", "serve_app.runpod"], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


@pytest.mark.parametrize(("var", "value"), [("GGUF_SERVE_RUNPOD_MAX_CONCURRENCY", "lots"),
                                            ("GGUF_SERVE_RUNPOD_MAX_CONCURRENCY", "0"),
                                            ("GGUF_SERVE_RUNPOD_READY_TIMEOUT_S", "-5"),
                                            ("GGUF_SERVE_RUNPOD_MAX_INPUT_BYTES", "12"),
                                            ("GGUF_SERVE_LOW_LATENCY", "maybe")])
def test_a_bad_setting_is_one_line_and_exit_1(var: str, value: str) -> None:
    r = run_worker(**{var: value})
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"runpod worker cannot start: {var}: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
