"""The whole graph serves: ModelCache pulls from the (loopback) Hub, LlamaModel loads it, the ingress answers the
real ``openai`` client. Protects the walking skeleton every later feature hangs on."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from ray import serve

from serve_app.builder import build_app
from tests.conftest import TEST_FILE, TEST_REPO

pytestmark = pytest.mark.timeout(240)


def wait_ready(base: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    last: dict = {}
    while time.time() < deadline:
        r = httpx.get(f"{base}/ready", timeout=10)
        last = r.json()
        if r.status_code == 200:
            return last
        assert last["status"] in ("loading",), last
        time.sleep(0.2)
    raise AssertionError(f"not ready: {last}")


@pytest.fixture(scope="module")
def app_url(ray_session: str, tmp_path_factory) -> str:
    args = {
        "model": {"repo_id": TEST_REPO, "filename": TEST_FILE},
        "cache_dir": str(tmp_path_factory.mktemp("volume")),
        "accelerator": "auto",
        "engine": {"n_parallel": 4, "n_ctx_per_slot": 512, "max_queue": 8},
    }
    serve.run(build_app(args), name="llm", route_prefix="/")
    yield ray_session
    serve.delete("llm")


def test_readiness_then_chat_completion(app_url: str) -> None:
    info = wait_ready(app_url)
    assert info["model"] == f"{TEST_REPO}/tiny-chat-F16"
    client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == [info["model"]]
    out = client.chat.completions.create(
        model=info["model"], messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    assert out.choices[0].message.content
