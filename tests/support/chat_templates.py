"""Real chat templates of each tool-call family, as test data (copied from the models' repositories; a template
is untrusted data, rendered in the sandbox like any other)."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).parent / "templates"

QWEN25 = "Qwen-Qwen2.5-7B-Instruct.jinja"
HERMES3 = "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct.jinja"
LLAMA32 = "meta-llama-Llama-3.2-3B-Instruct.jinja"
MISTRAL_NEMO = "mistralai-Mistral-Nemo-Instruct-2407.jinja"
QWEN3 = "Qwen-Qwen3-0.6B.jinja"
QWEN3_CODER = "Qwen3-Coder.jinja"
QWEN35 = "Qwen-Qwen3.5-4B.jinja"
R1_DISTILL = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"
GEMMA2 = "google-gemma-2-2b-it.jinja"


def template(name: str) -> str:
    return (_DIR / name).read_text()
