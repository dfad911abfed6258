"""``/v1/embeddings`` responses, and the one readiness view of several models."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from serve_app.errors import InvalidRequestError
from serve_app.protocol import Embeddings, ModelInfo

_SUMMED = ("slots_total", "slots_busy", "waiting", "kv_cells_used", "kv_cells_total", "tokens_generated",
           "tokens_prompt", "preemptions")


def embedding_response(model: str, out: Embeddings, encoding_format: str, dimensions: int | None) -> dict[str, Any]:
    """The OpenAI shape: ``data[i].embedding`` a list of floats, or base64 of the float32 little-endian bytes
    (what the openai client decodes). ``dimensions`` is refused unless it is the model's own size: cutting a
    vector is only meaningful for Matryoshka-trained models, which a GGUF does not declare."""
    data = []
    for i, raw in enumerate(out.vectors):
        n = len(raw) // 4
        if dimensions is not None and dimensions != n:
            raise InvalidRequestError(f"this model's embeddings have {n} dimensions; 'dimensions' may only be {n}",
                                      param="dimensions")
        vec: Any = base64.b64encode(raw).decode("ascii") if encoding_format == "base64" else \
            np.frombuffer(raw, dtype="<f4").tolist()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens}}


def merge_infos(infos: list[ModelInfo]) -> ModelInfo:
    """One model: its info. Several: ready only when all are; otherwise the first one that is not ready
    (``failed`` before ``loading``), its reason prefixed with its name; the load figures summed."""
    if len(infos) == 1:
        return infos[0]
    worst = next((i for i in infos if i.state == "failed"), None) or next(
        (i for i in infos if i.state != "ready"), infos[0])
    update: dict[str, Any] = {k: sum(getattr(i, k) for i in infos) for k in _SUMMED}
    if worst.reason:
        update["reason"] = f"{worst.model}: {worst.reason}"
    update["detail"] = "; ".join(f"{i.model}: {i.detail}" for i in infos if i.detail) or None
    return worst.model_copy(update=update)
