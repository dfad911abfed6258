"""With two LlamaModel replicas behind the real Ray Serve router, every turn of a conversation is served by the
replica that served its first turn (``timings.replica``), so its prefix is reused there (``cached_tokens`` > 0
from the second turn on), while independent conversations spread over both replicas; and requests that would
queue behind the full slots of their conversation's replica go to the other one (Serve calls the router's
send and completion hooks, which keep its count)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from serve_app import builder
from serve_app.config import AppArgs
from tests.conftest import LLM_APP_ARGS, wait_ready

pytestmark = pytest.mark.timeout(180)

SYSTEM = "You are a careful assistant who answers briefly. " * 4


def two_replica_app(volume: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app as ``build_app`` wires it, with LlamaModel's options overridden the way a Serve config's
    ``deployments:`` entry would: two replicas, half a logical CPU each (both fit beside the session's other apps;
    llama.cpp's one thread does the work)."""
    plain = builder.llama_model_options

    def two_replicas(args: AppArgs, use_gpu: bool) -> dict[str, Any]:
        opts = plain(args, use_gpu)
        return {**opts, "num_replicas": 2, "ray_actor_options": {**opts["ray_actor_options"], "num_cpus": 0.5}}

    monkeypatch.setattr(builder, "llama_model_options", two_replicas)
    return builder.build_app({**LLM_APP_ARGS, "cache_dir": str(volume),
                              "engine": {"n_parallel": 2, "n_ctx_per_slot": 512, "n_threads": 1}})


def wait_both_ready(base: str) -> None:
    """/ready goes to either replica at random: ten 200s in a row mean both have loaded (else chance 2**-10;
    then the client's retries on 503 cover the rest)."""
    streak = 0
    while streak < 10:
        streak = streak + 1 if wait_ready(base, timeout=60) and httpx.get(f"{base}/ready").status_code == 200 else 0


def cached_tokens(usage: Any) -> int:
    """Reused prompt tokens: OpenAI's ``prompt_tokens_details.cached_tokens``, or the flat ``cached_tokens``."""
    details = getattr(usage, "prompt_tokens_details", None)
    if details is not None and details.cached_tokens is not None:
        return int(details.cached_tokens)
    return int((usage.model_extra or {}).get("cached_tokens", 0))


def turn(client: openai.OpenAI, messages: list[dict[str, str]], max_tokens: int) -> Any:
    return client.chat.completions.create(model="", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})


def test_conversations_stick_to_a_replica_and_spread_over_replicas(ray_session: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    serve.run(two_replica_app(tmp_path / "volume", monkeypatch), name="affinity", route_prefix="/affinity")
    try:
        wait_both_ready(f"{ray_session}/affinity")
        client = openai.OpenAI(base_url=f"{ray_session}/affinity/v1", api_key="x", max_retries=8)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "tell me about rivers"}]
        served, cached = [], []
        for k in range(4):
            out = turn(client, messages, 4)
            served.append(out.model_extra["timings"]["replica"])
            cached.append(cached_tokens(out.usage))
            messages += [{"role": "assistant", "content": out.choices[0].message.content or ""},
                         {"role": "user", "content": f"and then, part {k}?"}]
        assert served[0] and len(set(served)) == 1, served
        assert all(c > 0 for c in cached[1:]), cached  # every later turn reuses the conversation's prefix

        by_conversation = []
        for i in range(12):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"topic {i}"}]
            first = turn(client, messages, 1)
            messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                         {"role": "user", "content": "more"}]
            second = turn(client, messages, 1)
            by_conversation.append((first.model_extra["timings"]["replica"],
                                    second.model_extra["timings"]["replica"]))
        # By chance (no affinity) every pair would match with probability 2**-12; all 12 conversations on one
        # replica, with a fair hash, 2**-11.
        assert all(a == b for a, b in by_conversation), by_conversation
        assert len({a for a, _ in by_conversation}) == 2, by_conversation

        # Four requests of one conversation at once on 2-slot replicas: two fill its replica, two go to the other.
        burst = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "one busy conversation"}]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda _: turn(client, burst, 300), range(4)))
        replicas = Counter(o.model_extra["timings"]["replica"] for o in outs)
        assert sorted(replicas.values()) == [2, 2], replicas
    finally:
        serve.delete("affinity")
