"""The whole graph serves: ModelCache pulls from the (loopback) Hub, LlamaModel loads it, the ingress answers the
real ``openai`` client. Protects the walking skeleton every later feature hangs on."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import TEST_REPO, wait_ready

pytestmark = pytest.mark.timeout(240)


def test_readiness_then_chat_completion(llm_app: str) -> None:
    app_url = llm_app
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
