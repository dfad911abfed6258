"""Invariant: one application serves several models, each in its own deployment, and the request's ``model``
picks the one that answers: ``/v1/models`` lists them all; every chat model answers under its own name; an
unknown name is a 404 listing what is served, ``base:adapter`` a 400 saying why; ``/v1/embeddings`` returns the
OpenAI shape (float and base64 the same vectors, L2 norm 1, a batch the same vectors as one input at a time,
token-list inputs, usage); asking a chat model for embeddings or an embedding model for chat is a 400. The RunPod
handler serves embeddings through the same Ingress handle (``openai_route: /v1/embeddings``).

One multi-model app (two tiny chat models, one tiny embedding model, 1 slot each) serves the whole module.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import TEST_FILE, TEST_REPO, wait_ready
from tests.support.gguf_factory import ModelSpec, write_gguf

pytestmark = pytest.mark.timeout(240)

APP, PREFIX = "multi", "/multi"
ALPHA, BETA, EMBED = "alpha", "beta", "embed-mini"
TEXTS = ["the quick brown fox", "hello world", "one two three four five yes no"]


@pytest.fixture(scope="module")
def multi_app(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.builder import build_app

    d = tmp_path_factory.mktemp("multi")
    beta = write_gguf(d / "beta.gguf", ModelSpec(seed=7, name="beta"))
    embed = write_gguf(d / "embed.gguf", ModelSpec(seed=3, chat_template=None, pooling="mean", name="embed"))
    small = {"n_parallel": 1, "n_ctx_per_slot": 256, "n_batch": 256, "n_ubatch": 256, "n_threads": 1}
    args = {
        "models": [
            {"repo_id": TEST_REPO, "filename": TEST_FILE, "name": ALPHA},
            {"filename": beta, "name": BETA},
            {"filename": embed, "name": EMBED, "kind": "embedding", "engine": {"n_parallel": 4}},
        ],
        "engine": small, "cache_dir": str(d / "volume"), "accelerator": "cpu",
    }
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = ray_session + PREFIX
    try:
        wait_ready(base)
        yield base
    finally:
        serve.delete(APP, _blocking=False)  # the session cluster has room; do not wait out the replicas


@pytest.fixture(scope="module")
def client(multi_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{multi_app}/v1", api_key="none", max_retries=0)


def test_models_lists_every_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [ALPHA, BETA, EMBED]


def test_each_chat_model_answers_under_its_name(client: openai.OpenAI) -> None:
    texts = {}
    for name in (ALPHA, BETA):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert r.model == name and r.usage and r.usage.completion_tokens == 6
        texts[name] = r.choices[0].message.content
    assert texts[ALPHA] != texts[BETA]  # two different weight sets answered
    stream = client.completions.create(model=BETA, prompt="the quick", max_tokens=4, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert {c.model for c in stream} == {BETA}


def test_unknown_model_is_404_listing_the_served_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    msg = str(e.value)
    assert "gamma" in msg and all(n in msg for n in (ALPHA, BETA, EMBED)), msg
    with pytest.raises(openai.BadRequestError, match="LoRA adapters"):
        client.chat.completions.create(model=f"{ALPHA}:style", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)


def test_embeddings_shapes(client: openai.OpenAI, multi_app: str) -> None:
    floats = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert floats.model == EMBED and [d.index for d in floats.data] == [0, 1, 2]
    batch = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert batch.shape == (3, 64)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-3)
    assert floats.usage.prompt_tokens > len(TEXTS) and floats.usage.total_tokens == floats.usage.prompt_tokens
    # base64: the same float32 vectors (the raw wire, then the openai client's own decoding)
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=TEXTS, encoding_format="base64")
    b64 = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw.http_response.json()["data"]]
    assert np.array_equal(np.stack(b64), batch)
    # a batch gives the vectors each input gets on its own
    for i, text in enumerate(TEXTS):
        one = client.embeddings.create(model=EMBED, input=text).data[0].embedding
        assert np.allclose(one, batch[i], atol=1e-3)
    # token-list inputs: one list is one input, a list of lists is several
    tokens = httpx.post(f"{multi_app}/tokenize", json={"content": TEXTS[1], "model": ALPHA}, timeout=10).json()["tokens"]
    by_tokens = client.embeddings.create(model=EMBED, input=[tokens, tokens])
    assert len(by_tokens.data) == 2 and by_tokens.usage.prompt_tokens == 2 * len(tokens)
    assert client.embeddings.create(model=EMBED, input=tokens).usage.prompt_tokens == len(tokens)


def test_wrong_kind_of_model_is_400(client: openai.OpenAI, multi_app: str) -> None:
    with pytest.raises(openai.BadRequestError, match=f"'{ALPHA}' is a chat model.*{EMBED}"):
        client.embeddings.create(model=ALPHA, input="hello")
    with pytest.raises(openai.BadRequestError, match=f"'{EMBED}' is an embedding model.*{ALPHA}, {BETA}"):
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    r = httpx.post(f"{multi_app}/v1/embeddings", json={"model": EMBED, "input": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    r = httpx.post(f"{multi_app}/v1/embeddings", json={"model": EMBED, "input": "x" * 2000}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    for body in ({"model": EMBED, "input": [1, "a"]}, {"model": EMBED, "input": [-1]},
                 {"model": EMBED, "input": [[2**40]]}, {"model": EMBED, "input": "x", "encoding_format": "hex"},
                 {"model": EMBED, "input": "x", "dimensions": 0}, {"model": EMBED, "input": "x", "dimensions": 3},
                 {"model": EMBED, "input": {"a": 1}}, {"model": EMBED}, [EMBED], {"model": 5, "input": "x"}):
        r = httpx.post(f"{multi_app}/v1/embeddings", json=body, timeout=10)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, (body, r.text)
    # /ready covers every model
    assert httpx.get(f"{multi_app}/ready", timeout=10).json()["status"] == "ready"


def test_runpod_embeddings_job(multi_app: str) -> None:
    """The worker's handler, in this process, on the multi app's real Ingress handle."""
    from ray import serve

    from serve_app.runpod import handler as job_handler

    async def run(job_input: dict[str, Any]) -> list[Any]:
        return [item async for item in job_handler.handler({"id": "job-1", "input": job_input})]

    worker = job_handler.WORKER
    assert worker.handle is None
    worker.handle = serve.get_deployment_handle("Ingress", APP)
    try:
        [out] = asyncio.run(run({"openai_route": "/v1/embeddings",
                                 "openai_input": {"model": EMBED, "input": TEXTS[:2]}}))
        assert out["object"] == "list" and len(out["data"]) == 2 and out["model"] == EMBED, out
        assert len(out["data"][0]["embedding"]) == 64
        [err] = asyncio.run(run({"openai_route": "/v1/embeddings", "openai_input": {"model": BETA, "input": "x"}}))
        assert err["error"]["code"] == "invalid_request" and "chat model" in err["error"]["message"], err
        [chat] = asyncio.run(run({"openai_input": {"model": BETA, "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 3}}))
        assert chat["model"] == BETA, chat
    finally:
        worker.handle = None


def test_cache_pull_warms_every_model_of_a_config(multi_app: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    from tests.support.fake_runpod import REPO

    local = write_gguf(tmp_path / "local.gguf", ModelSpec(seed=11))
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "llm", "import_path": "serve_app.builder:build_app",
                                                        "args": {"models": [
                                                            {"repo_id": TEST_REPO, "filename": TEST_FILE},
                                                            {"filename": local, "kind": "embedding"}],
                                                            "cache_dir": str(tmp_path / "vol")}}]}))
    r = subprocess.run([sys.executable, "-m", "serve_app.cache", "pull", "--config", str(config)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("present") == 2, r.stdout
