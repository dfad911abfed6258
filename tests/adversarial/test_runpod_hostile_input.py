"""Invariant: a hostile RunPod job input (over the size limit, a lone UTF-16 surrogate in a message or in
``model``, JSON nested far deeper than any OpenAI body) sent through RunPod's own local API to the real worker is
answered with one ``{"error": {...}}`` item carrying a 4xx-class code (``request_too_large`` /
``invalid_request``), never an HTTP 500, a Python repr or a traceback, and the worker keeps serving normal jobs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_app.errors import ERRORS_BY_CODE
from tests.conftest import free_port
from tests.support.fake_runpod import local_api_worker

pytestmark = pytest.mark.timeout(300)

MAX_INPUT_BYTES = 64 * 1024
MSGS = [{"role": "user", "content": "hello there"}]
GEN = {"max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def local_api(llm_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("runpod_hostile") / "worker.log"
    with local_api_worker(log_path, free_port(), GGUF_SERVE_RUNPOD_MAX_INPUT_BYTES=str(MAX_INPUT_BYTES)) as base:
        yield base


def runsync_raw(base: str, payload: bytes) -> httpx.Response:
    """POST /runsync with a hand-written body (json= would refuse a lone surrogate)."""
    return httpx.post(f"{base}/runsync", content=payload, headers={"content-type": "application/json"}, timeout=120)


def job_error(r: httpx.Response) -> dict[str, Any]:
    """The one error item the job produced, checked to be a client error in our OpenAI shape."""
    assert r.status_code == 200, (r.status_code, r.text[:2000])
    out = r.json()
    assert out["status"] == "COMPLETED", out  # the local API returns error items as the output
    [item] = out["output"]
    err = item["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert ERRORS_BY_CODE[err["code"]].status // 100 == 4, err
    assert err["type"] == "invalid_request_error", err
    assert "Traceback" not in err["message"] and "\n" not in err["message"], err
    return err


def assert_serves_a_normal_job(base: str) -> None:
    r = httpx.post(f"{base}/runsync", json={"input": {"messages": MSGS, "sampling_params": GEN}}, timeout=120)
    out = r.json()
    assert out["status"] == "COMPLETED" and out["output"][0]["object"] == "chat.completion", out


def test_input_over_the_size_limit_is_refused_as_request_too_large(local_api: str) -> None:
    big = "word " * (MAX_INPUT_BYTES // 5 + 100)
    for job in ({"prompt": big, "sampling_params": GEN},
                {"openai_route": "/v1/chat/completions",
                 "openai_input": {"messages": [{"role": "user", "content": big}], **GEN}}):
        err = job_error(httpx.post(f"{local_api}/runsync", json={"input": job}, timeout=120))
        assert err["code"] == "request_too_large" and str(MAX_INPUT_BYTES) in err["message"], err
    # just under the limit is an ordinary job (the limit is on the input, not on the prompt's tokens)
    assert_serves_a_normal_job(local_api)


@pytest.mark.parametrize("where", ["content", "model", "key"])
def test_a_lone_surrogate_is_an_invalid_request(local_api: str, where: str) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **GEN}
    if where == "content":
        body["messages"][0]["content"] = "hi \\ud800 there"
    elif where == "model":
        body["model"] = "\\ud800"
    else:
        body["messages"][0]["\\udfff"] = 1
    text = json.dumps({"input": {"openai_route": "/v1/chat/completions", "openai_input": body}})
    err = job_error(runsync_raw(local_api, text.replace("\\\\u", "\\u").encode()))
    assert err["code"] == "invalid_request" and "surrogate" in err["message"], err
    assert err["param"] and err["param"].startswith("openai_input"), err
    assert_serves_a_normal_job(local_api)


def raw_job(template: dict[str, Any], value: str) -> bytes:
    """``{"input": template}`` as JSON text with ``value`` (raw JSON text) put where the template says VALUE."""
    return json.dumps({"input": template}).replace('"VALUE"', value).encode()


@pytest.mark.parametrize("depth", [200, 950, 100_000])
def test_deeply_nested_json_is_an_invalid_request(local_api: str, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    for template in ({"messages": [{"role": "user", "content": "VALUE"}]},
                     {"openai_input": {"messages": MSGS, "metadata": "VALUE"}}):
        r = runsync_raw(local_api, raw_job(template, nested))
        if depth > 900 and r.status_code == 400:
            # RunPod's own API refuses a body Python's json module cannot parse, before any worker code runs
            assert "Traceback" not in r.text and "error parsing the body" in r.text, r.text[:500]
            continue
        err = job_error(r)
        assert err["code"] == "invalid_request" and "nested" in err["message"], err
    assert_serves_a_normal_job(local_api)


def test_nan_and_infinity_are_not_json(local_api: str) -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        template = {"prompt": "hi", "sampling_params": {"max_tokens": 4, "temperature": "VALUE"}}
        err = job_error(runsync_raw(local_api, raw_job(template, literal)))
        assert err["param"] == "sampling_params.temperature" and literal in err["message"], err
    assert_serves_a_normal_job(local_api)
