"""Invariant: no job input, however malformed, makes the RunPod worker fail on its own side. A seeded fuzzer sends
a few hundred broken jobs (wrong types, huge numbers, NaN/Infinity, unknown roles, junk in every OpenAI field,
missing fields, nested junk) through RunPod's own local API (``--rp_serve_api``) to the real worker on the real
model; every answer is either one ``{"error": {...}}`` item whose code is a 4xx-class error, or a valid OpenAI
response (a dict, or SSE strings ending ``data: [DONE]``). None is an HTTP 500, a server error, a Python repr or a
traceback, and afterwards the worker still serves a normal job.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from serve_app.errors import ERRORS_BY_CODE
from tests.conftest import free_port
from tests.support.fake_runpod import local_api_worker

pytestmark = pytest.mark.timeout(300)

SEED = 20261202
N_JOBS = 500
MSGS = [{"role": "user", "content": "hi"}]
BASE = {"messages": MSGS, "max_tokens": 2, "temperature": 0}
OPENAI_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                 "top_k", "min_p", "stop", "seed", "n", "stream", "stream_options", "presence_penalty",
                 "frequency_penalty", "repeat_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
                 "tools", "tool_choice", "user", "ignore_eos", "echo", "suffix", "best_of"]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


JUNK: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, -(10**30), 1e308, -1e308, 5e-324, 0.5,
    float("nan"), float("inf"), float("-inf"), "", "x", "0", "NaN", "\x00", "é" * 50, "x" * 5000, [], [None],
    [1, "a", None], [[[]]], {}, {"a": {"b": {"c": [1, {}]}}}, {"type": "json_object"}, ["stop", 1],
    [-1, 2**40], list(range(-5, 5)), {"role": "user"}, "\ud800", "ok \udfff", ["\ud83d"], {"\udc00": 1},
    nested(120),
]
ROLES = ["user", "assistant", "system", "tool", "developer", "function", "robot", "", "USER", None, 5, ["user"]]


def junk(rng: random.Random) -> Any:
    return rng.choice(JUNK)


def bad_message(rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        return {"role": rng.choice(ROLES), "content": "hi"}
    if kind == 1:
        return {"role": "user", "content": junk(rng)}
    if kind == 2:
        return {"role": "user", "content": [{"type": rng.choice(["text", "image_url", "audio", None, 3]),
                                             "text": junk(rng), "image_url": junk(rng)}]}
    if kind == 3:
        return rng.choice([{"content": "hi"}, {"role": "user"}, {}, "hi", 3, None, []])
    if kind == 4:
        return {"role": "tool", "content": "x", "tool_call_id": junk(rng)}
    return {"role": "assistant", "content": None, "tool_calls": junk(rng), rng.choice(["name", "x"]): junk(rng)}


def openai_job(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = dict(BASE)
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(OPENAI_FIELDS)
        body[field] = bad_message(rng) if field == "messages" and rng.random() < 0.3 else junk(rng)
    if rng.random() < 0.4:
        body["messages"] = [bad_message(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.15:
        body.pop(rng.choice(["messages", "max_tokens"]), None)
    route = rng.choice(["/v1/chat/completions"] * 4 + ["/v1/completions", "/v1/models", "v1/chat/completions/"])
    if route == "/v1/completions":
        body.pop("messages", None)
        body["prompt"] = rng.choice([junk(rng), "hi", [1, 2, 3], [-1], [2**31], [10**6], ["a", 1], [[1, 2]]])
    return {"openai_route": route, "openai_input": body}


def legacy_job(rng: random.Random) -> dict[str, Any]:
    job: dict[str, Any] = rng.choice([{"messages": MSGS}, {"prompt": "hi"}, {"prompt": junk(rng)},
                                      {"messages": [bad_message(rng)]}, {"messages": junk(rng)}])
    job["sampling_params"] = {"max_tokens": 2}
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            job["sampling_params"][rng.choice(OPENAI_FIELDS + ["repetition_penalty"])] = junk(rng)
        else:
            job[rng.choice(["stream", "apply_chat_template", "use_openai_format", "max_batch_size",
                            "min_batch_size", "batch_size_growth_factor"])] = junk(rng)
    if rng.random() < 0.15:
        job["sampling_params"] = junk(rng)
    return job


def shape_job(rng: random.Random) -> Any:
    """Junk in the job's own keys: routes, methods, bodies of the wrong type, unknown keys."""
    return rng.choice([
        {"openai_route": junk(rng), "openai_input": {"messages": MSGS}},
        {"openai_route": "/v1/chat/completions", "openai_input": junk(rng)},
        {"route": junk(rng), "body": {"messages": MSGS}},
        {"route": "/v1/completions", "body": junk(rng), "method": junk(rng)},
        {"openai_input": {"messages": MSGS}, junk_key(rng): junk(rng)},
        {junk_key(rng): junk(rng)},
        {},
    ])


def junk_key(rng: random.Random) -> str:
    return rng.choice(["", " ", "input", "__class__", "openai_inputs", "x" * 300, "stream\x00", "é"])


def fuzz_inputs(seed: int, n: int) -> list[Any]:
    rng = random.Random(seed)
    makers = [openai_job] * 5 + [legacy_job] * 3 + [shape_job] * 2
    return [rng.choice(makers)(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def local_api(llm_app: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("runpod_fuzz") / "worker.log"
    with local_api_worker(log_path, free_port()) as base:
        yield base


def runsync(base: str, job_input: Any) -> httpx.Response:
    # json.dumps writes NaN/Infinity literals, which Python's JSON parser (RunPod's API) accepts
    payload = json.dumps({"input": job_input}).encode()
    return httpx.post(f"{base}/runsync", content=payload, headers={"content-type": "application/json"}, timeout=120)


def problem(job_input: Any, r: httpx.Response) -> str | None:
    """Why this answer breaks the invariant, or None when it is a 4xx error item or a valid OpenAI response."""
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    out = r.json()
    items = out.get("output")
    if out.get("status") != "COMPLETED" or not isinstance(items, list) or not items:
        return f"not a completed job with output: {out}"
    if isinstance(items[0], dict) and "error" in items[0]:
        err = items[0]["error"]
        if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
            return f"error is not OpenAI-shaped: {err!r}"
        cls = ERRORS_BY_CODE.get(err["code"])
        if len(items) != 1 or cls is None or cls.status // 100 != 4 or "Traceback" in err["message"]:
            return f"not one 4xx error item: {items}"
        return None
    if isinstance(items[0], dict):
        ok = len(items) == 1 and items[0].get("object") in ("chat.completion", "text_completion", "list")
        return None if ok else f"not one OpenAI response: {items}"
    if not all(isinstance(i, str) and i.startswith("data: ") for i in items) or items[-1] != "data: [DONE]\n\n":
        return f"not an SSE stream ending [DONE]: {items}"
    for block in "".join(items[:-1]).split("\n\n"):
        if block.strip():
            chunk = json.loads(block[len("data: "):])
            if "error" in chunk or chunk.get("object") not in ("chat.completion.chunk", "text_completion"):
                return f"bad stream chunk: {chunk}"
    return None


def test_malformed_jobs_get_client_errors_or_valid_responses(local_api: str) -> None:
    inputs = fuzz_inputs(SEED, N_JOBS)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda job: (job, runsync(local_api, job)), inputs))
    elapsed = time.monotonic() - t0
    problems = [(job, why) for job, r in answers if (why := problem(job, r)) is not None]
    report = "\n".join(f"{json.dumps(job)[:300]}\n  -> {why[:500]}" for job, why in problems[:15])
    assert not problems, f"{len(problems)} of {len(inputs)} jobs broke the invariant:\n{report}"
    n_errors = sum(1 for _, r in answers if "error" in r.json()["output"][0])
    print(f"{len(inputs)} fuzzed jobs in {elapsed:.1f} s: {n_errors} client errors, {len(inputs) - n_errors} served")
    assert n_errors > len(inputs) // 2  # the fuzzer mostly produces broken jobs
    r = runsync(local_api, {"messages": MSGS, "sampling_params": {"max_tokens": 4, "temperature": 0}})
    out = r.json()
    assert out["status"] == "COMPLETED" and out["output"][0]["usage"]["completion_tokens"] == 4, out


def test_the_fuzzer_is_deterministic() -> None:
    assert json.dumps(fuzz_inputs(SEED, 50)) == json.dumps(fuzz_inputs(SEED, 50))
