"""Invariants: every job input shape worker-vllm accepts (OpenAI gateway ``openai_route``/``openai_input``, the
generic ``route``/``body`` form, legacy ``messages``/``prompt`` + ``sampling_params`` + ``stream``) maps to exactly
one ingress call with the right route, body and stream flag, and anything else is rejected with a readable,
OpenAI-shaped ``invalid_request_error`` (never an exception escaping to the SDK). Also the worker's pure policy:
Ray failures become typed error values without tracebacks, and the concurrency it reports to the SDK follows the
engine's free slots, clamped, and stays steady under its own load; the worker module never imports the engine or
llama_cpp. No Ray cluster is started here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from serve_app.errors import InvalidRequestError, QueueFullError
from serve_app.routes import CHAT, COMPLETIONS, MODELS, response_id
from serve_app.runpod.bootstrap import _deploy_failure
from serve_app.runpod.handler import Worker, as_serve_error, concurrency_target, error_output
from serve_app.runpod.input import IngressCall, normalise

MSGS = [{"role": "user", "content": "hi"}]


def rejects(raw: Any, *fragments: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as ei:
        normalise(raw)
    body = ei.value.to_dict()
    assert body["type"] == "invalid_request_error" and body["code"] == "invalid_request"
    for f in fragments:
        assert f in body["message"], body
    assert "Traceback" not in body["message"]
    return ei.value


# ---- OpenAI gateway shape -----------------------------------------------------------------------------------


def test_openai_chat_non_stream() -> None:
    body = {"model": "m", "messages": MSGS, "max_tokens": 8}
    call = normalise({"openai_route": "/v1/chat/completions", "openai_input": body})
    assert call == IngressCall(route=CHAT, body=body, stream=False)
    assert response_id(call.route, "job1") == "chatcmpl-job1"


def test_openai_stream_flag_comes_from_the_body() -> None:
    call = normalise({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "stream": True}})
    assert (call.route, call.stream, response_id(call.route, "j")) == (COMPLETIONS, True, "cmpl-j")


def test_openai_input_alone_defaults_to_chat() -> None:
    assert normalise({"openai_input": {"messages": MSGS}}).route == CHAT


@pytest.mark.parametrize("raw", [
    {"openai_route": "/v1/models"},
    {"openai_route": "/v1/models", "openai_input": {}},
    {"openai_route": "/v1/models", "openai_input": None},
    {"openai_route": "/v1/models/", "openai_input": {"stream": True}},
    {"openai_route": "v1/models"},
])
def test_models_is_get_like(raw: dict[str, Any]) -> None:
    assert normalise(raw) == IngressCall(route=MODELS, body=None, stream=False)


def test_the_job_input_is_not_mutated() -> None:
    body = {"messages": MSGS, "stream": False}
    call = normalise({"openai_input": body})
    assert call.body == body and call.body is not body


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/messages", "/health"])
def test_unsupported_route(route: str) -> None:
    err = rejects({"openai_route": route, "openai_input": {"x": 1}}, "unsupported openai_route", route,
                  "/v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings")
    assert err.param == "openai_route"


@pytest.mark.parametrize("raw", [{"openai_route": "/v1/chat/completions"},
                                 {"openai_route": "/v1/completions", "openai_input": {}},
                                 {"openai_input": {}}])
def test_generation_routes_need_a_body(raw: dict[str, Any]) -> None:
    rejects(raw, "openai_input", "required")


def test_stream_must_be_a_boolean() -> None:
    err = rejects({"openai_input": {"messages": MSGS, "stream": "yes"}}, "openai_input.stream", "true or false")
    assert err.param == "openai_input.stream"


def test_openai_input_must_be_an_object() -> None:
    rejects({"openai_route": "/v1/chat/completions", "openai_input": "hello"}, "openai_input")


def test_unknown_top_level_key_is_named() -> None:
    err = rejects({"openai_route": "/v1/models", "temperature": 0}, "unknown key 'temperature'", "'openai_route'")
    assert err.param == "temperature"


def test_shapes_do_not_mix() -> None:
    rejects({"openai_input": {"messages": MSGS}, "messages": MSGS}, "unknown key 'messages'")


# ---- worker-vllm's generic route form -----------------------------------------------------------------------


def test_generic_route_form() -> None:
    assert normalise({"route": "/v1/models"}).route == MODELS
    call = normalise({"route": "/v1/completions", "body": {"prompt": "hi"}, "method": "POST"})
    assert call == IngressCall(route=COMPLETIONS, body={"prompt": "hi"}, stream=False)
    rejects({"route": "/v1/completions", "body": {"prompt": "hi"}, "method": "GET"}, "POST")


# ---- legacy shape -------------------------------------------------------------------------------------------


def test_legacy_messages_go_to_chat() -> None:
    call = normalise({"messages": MSGS, "sampling_params": {"max_tokens": 8, "temperature": 0}})
    assert call == IngressCall(route=CHAT, body={"messages": MSGS, "max_tokens": 8, "temperature": 0,
                                                 "stream": False}, stream=False)


def test_legacy_prompt_merges_sampling_params() -> None:
    sp = {"max_tokens": 8, "temperature": 0.2, "top_p": 0.9, "top_k": 20, "stop": ["\n"], "seed": 7,
          "ignore_eos": True, "repetition_penalty": 1.1, "presence_penalty": 0.5}
    call = normalise({"prompt": "Once", "sampling_params": sp})
    assert call.route == COMPLETIONS and call.stream is False
    expected = {k: v for k, v in sp.items() if k != "repetition_penalty"}
    assert call.body == {**expected, "repeat_penalty": 1.1, "prompt": "Once", "stream": False}


def test_our_name_wins_over_the_vllm_alias() -> None:
    call = normalise({"prompt": "x", "sampling_params": {"repetition_penalty": 1.3, "repeat_penalty": 1.1}})
    assert call.body is not None and call.body["repeat_penalty"] == 1.1 and "repetition_penalty" not in call.body


def test_legacy_stream() -> None:
    call = normalise({"prompt": "x", "stream": True})
    assert call.stream is True and call.body == {"prompt": "x", "stream": True}


def test_legacy_apply_chat_template_turns_a_prompt_into_a_user_message() -> None:
    call = normalise({"prompt": "hello", "apply_chat_template": True})
    assert call.route == CHAT and call.body is not None
    assert call.body["messages"] == [{"role": "user", "content": "hello"}]


def test_legacy_worker_vllm_knobs_are_accepted() -> None:
    call = normalise({"prompt": "x", "max_batch_size": 50, "min_batch_size": 1, "batch_size_growth_factor": 3,
                      "use_openai_format": True})
    assert call.route == COMPLETIONS and call.body == {"prompt": "x", "stream": False}


@pytest.mark.parametrize(("raw", "fragments"), [
    ({"messages": MSGS, "prompt": "x"}, ("exactly one of 'messages' or 'prompt'",)),
    ({"messages": []}, ("messages",)),
    ({"messages": "hi"}, ("messages",)),
    ({"prompt": "x", "sampling_params": [1, 2]}, ("sampling_params",)),
    ({"prompt": "x", "sampling_params": {"stream": True}}, ("sampling_params may not set 'stream'",)),
    ({"prompt": "x", "sampling_params": {"prompt": "y"}}, ("'prompt'",)),
    ({"prompt": "x", "stream": "true"}, ("stream",)),
    ({"prompt": "x", "temperature": 0.1}, ("unknown key 'temperature'", "'sampling_params'")),
    ({"prompt": ["a", "b"], "apply_chat_template": True}, ("string prompt",)),
])
def test_legacy_rejections(raw: dict[str, Any], fragments: tuple[str, ...]) -> None:
    rejects(raw, *fragments)


def test_the_documented_local_test_input_is_a_valid_job() -> None:
    job = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "runpod" / "test_input.json").read_text())
    assert set(job) == {"input"}
    assert normalise(job["input"]).route == CHAT


# ---- not a job at all ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "hello", 3, ["messages"]])
def test_input_must_be_an_object(raw: Any) -> None:
    rejects(raw, "must be a JSON object")


@pytest.mark.parametrize("raw", [{}, {"foo": 1}, {"sampling_params": {}}])
def test_unrecognised_input_lists_what_is_expected(raw: dict[str, Any]) -> None:
    rejects(raw, "unrecognised job input", "openai_route", "messages")


# ---- worker policy (pure parts of serve_app.runpod) --------------------------------------------------------


def info(total: int = 4, busy: int = 0, waiting: int = 0, state: str = "ready") -> dict[str, Any]:
    return {"state": state, "model": "m", "slots_total": total, "slots_busy": busy, "waiting": waiting}


def test_concurrency_follows_free_slots() -> None:
    assert concurrency_target(info(4, 0, 0), 0, None) == 4
    assert concurrency_target(info(4, 3, 0), 0, None) == 1  # someone else (HTTP) holds 3 slots
    assert concurrency_target(info(4, 2, 0), 0, None) == 2
    assert concurrency_target(info(4, 4, 5), 0, None) == 1  # never 0: the SDK would stop polling
    assert concurrency_target(info(8, 0, 0), 0, 3) == 3  # GGUF_SERVE_RUNPOD_MAX_CONCURRENCY caps it
    assert concurrency_target(info(2, 0, 0), 0, 6) == 2  # ...but never above the slots


def test_concurrency_counts_our_own_jobs_back_in() -> None:
    # 3 of the 4 busy slots are this worker's jobs: it may hold 4, not 1 (a change would stall the SDK).
    assert concurrency_target(info(4, 3, 0), 3, None) == 4
    assert concurrency_target(info(4, 4, 2), 4, None) == 2


def test_concurrency_without_figures_keeps_the_last_value() -> None:
    assert concurrency_target(info(state="loading"), 0, None) is None
    assert concurrency_target({"state": "ready"}, 0, None) is None


def test_worker_adopts_a_new_value_only_when_two_refreshes_agree() -> None:
    w = Worker()
    w.concurrency = 4
    w.observe(2)
    assert w.concurrency == 4
    w.observe(4)
    w.observe(2)
    assert w.concurrency == 4
    w.observe(2)
    assert w.concurrency == 2
    w.observe(None)
    assert w.concurrency == 2
    assert w.modifier(1) == 2  # no handle attached, no loop: just the cached value


def test_ray_failures_become_typed_values() -> None:
    died = as_serve_error(ActorDiedError())
    assert died.code == "engine_dead" and died.retryable
    assert isinstance(as_serve_error(BackPressureError(num_queued_requests=9, max_queued_requests=8)),
                      QueueFullError)
    assert "cancelled" in as_serve_error(RequestCancelledError("r1")).message
    wrapped = RayTaskError("openai", "Traceback (most recent call last):\n  File x", ValueError("bad\nthing"))
    err = as_serve_error(wrapped.as_instanceof_cause())
    assert err.message == "worker error: ValueError: bad" and err.to_dict()["type"] == "server_error"
    typed = RayTaskError("openai", "tb", QueueFullError("full")).as_instanceof_cause()
    assert as_serve_error(typed).code == "queue_full"


def test_a_bug_reaches_the_client_as_the_job_id_only_and_is_logged_with_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    wrapped = RayTaskError("openai", "Traceback (most recent call last):\n  File x",
                           ValueError("secret path /srv/x"))
    for exc in (ValueError("secret path /srv/x"), wrapped.as_instanceof_cause()):
        caplog.clear()
        with caplog.at_level("ERROR", logger="serve_app.runpod"):
            err = error_output(exc, "job-7")["error"]
        assert err["message"] == "worker error: internal error (job id job-7)", err
        assert err["code"] == "internal_error" and "secret" not in str(err)
        assert [r.exc_info for r in caplog.records if "job-7" in r.getMessage() and r.exc_info], caplog.text
    typed = error_output(QueueFullError("full"), "job-8")["error"]  # a typed error is itself, not logged as a bug
    assert typed["code"] == "queue_full" and typed["message"] == "full"


def test_response_ids_have_one_builder() -> None:
    assert response_id(CHAT, "r1") == "chatcmpl-r1" and response_id(COMPLETIONS, "r1") == "cmpl-r1"
    assert response_id(MODELS, "r1") == "req-r1"
    fresh = response_id(CHAT)
    assert fresh.startswith("chatcmpl-") and len(fresh) == len("chatcmpl-") + 24 and fresh != response_id(CHAT)


def test_a_failed_deploy_is_summarised_on_one_line() -> None:
    message = """Deploying app 'llm' failed with exception:
Traceback (most recent call last):
  File "/x/application_state.py", line 926, in _reconcile_build_app_task
    raise x
pydantic_core._pydantic_core.ValidationError: 1 validation error for AppArgs
bogus_arg
  Extra inputs are not permitted [type=extra_forbidden, input_value=1, input_type=int]
    For further information visit https://errors.pydantic.dev/2.14/v/extra_forbidden
"""
    assert _deploy_failure(message) == ("ValidationError: 1 validation error for AppArgs bogus_arg Extra inputs are "
                                        "not permitted [type=extra_forbidden, input_value=1, input_type=int]")
    assert _deploy_failure("Traceback...\n  File x\nModuleNotFoundError: No module named 'x'") == (
        "ModuleNotFoundError: No module named 'x'")
    assert _deploy_failure("replica failed health checks") == "replica failed health checks"


def test_the_worker_never_imports_the_engine() -> None:
    import subprocess
    import sys

    code = ("import sys, serve_app.runpod.bootstrap; "
            "print(sorted(m for m in sys.modules if m.startswith(('llama_cpp', 'serve_app.engine', 'serve_app.llama'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
