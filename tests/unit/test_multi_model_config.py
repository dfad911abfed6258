"""Invariant: a multi-model config is checked at deploy time (exactly one of ``model``/``models``, unique names,
valid per-model engine overrides, no ':' in names), ``model`` stays the one-model shorthand, and the Ingress's
model table routes a request's ``model`` to the right kind of model or refuses it with a 4xx that names what
is served. The embeddings wire shapes (inputs, base64, dimensions) and the merged readiness of several models
are pure functions, checked here without Ray.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.builder import deployment_name
from serve_app.config import AppArgs
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.ingress.embeddings import embedding_response, merge_infos
from serve_app.ingress.models import ModelTable, Served
from serve_app.protocol import Embeddings, ModelInfo
from serve_app.schemas import EmbeddingRequest

A = {"repo_id": "acme/a-GGUF", "filename": "a-Q4_K_M.gguf"}


def args(**kw: Any) -> AppArgs:
    return AppArgs.model_validate(kw)


def test_model_is_the_one_model_shorthand() -> None:
    one = args(model=A, server={"served_model_name": "any name: even this"})
    [entry] = one.served()
    assert one.entry_name(entry) == "any name: even this" and entry.kind == "chat"
    assert one.for_entry(entry).model == one.model


@pytest.mark.parametrize("kw, fragment", [
    ({}, "exactly one of 'model'"),
    ({"model": A, "models": [A]}, "exactly one of 'model'"),
    ({"models": [A, A]}, "repeated: acme/a-GGUF/a-Q4_K_M"),
    ({"models": [{**A, "name": "x"}, {**A, "name": "x", "kind": "embedding"}]}, "repeated: x"),
    ({"models": [{**A, "name": "base:lora"}]}, "name"),
    ({"models": [{**A, "engine": {"n_paralel": 2}}]}, "n_paralel"),
    ({"models": [{**A, "engine": {"n_batch": 32}}]}, "n_ubatch must be <= n_batch"),
    ({"models": [{**A, "kind": "rerank"}]}, "kind"),
    ({"models": [A], "server": {"served_model_name": "x"}}, "served_model_name applies to 'model' only"),
])
def test_bad_configs_fail_at_deploy_time(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(")):
        args(**kw)


def test_entries_get_their_own_engine_and_name() -> None:
    app = args(models=[{**A, "name": "a"}, {"filename": "/m/e.gguf", "kind": "embedding", "engine": {"n_parallel": 2}}],
               engine={"n_parallel": 8, "n_ctx_per_slot": 512}, cache_dir="/vol")
    a, e = app.served()
    assert app.model_name() == "a" and app.entry_name(e) == "e"
    one = app.for_entry(e)
    assert one.model is not None and one.model.filename == "/m/e.gguf" and one.models == []
    assert (one.engine.n_parallel, one.engine.n_ctx_per_slot) == (2, 512)
    assert one.server.served_model_name == "e"
    assert AppArgs.model_validate(one.model_dump(mode="json")) == one  # what a model deployment is bound with
    assert deployment_name("chat", "acme/x#1", True) == "LlamaModel-acme_x_1"
    assert deployment_name("embedding", "e", False) == "EmbeddingModel"


def table() -> ModelTable:
    return ModelTable([Served("a", "chat", "ha"), Served("b", "chat", "hb"), Served("e", "embedding", "he")])


def test_the_request_model_picks_the_handle() -> None:
    t = table()
    assert t.pick("b", "chat").handle == "hb" and t.pick(None, "chat").handle == "ha"
    assert t.pick(None, "embedding").handle == "he"  # no name: the first model that does the job
    with pytest.raises(ModelNotFoundError, match="'zz' is not served here; available: a, b, e") as e:
        t.pick("zz", "chat")
    assert e.value.status == 404 and e.value.param == "model"
    with pytest.raises(InvalidRequestError, match="LoRA adapters by request are not supported"):
        t.pick("a:style", "chat")
    with pytest.raises(ModelNotFoundError):
        t.pick("zz:style", "chat")  # an unknown base is still unknown
    with pytest.raises(InvalidRequestError, match="'e' is an embedding model .* models that do: a, b"):
        t.pick("e", "chat")
    with pytest.raises(InvalidRequestError, match="'a' is a chat model .* models that do: e"):
        t.pick("a", "embedding")


def test_embedding_request_inputs() -> None:
    def inputs(v: Any) -> Any:
        return EmbeddingRequest.model_validate({"input": v}).inputs()

    assert inputs("hi") == ("hi",)
    assert inputs(["a", "b"]) == ("a", "b")
    assert inputs([1, 2, 3]) == ((1, 2, 3),)
    assert inputs([[1, 2], [3]]) == ((1, 2), (3,))
    for bad in ([], [[]], [None], 5, {"x": 1}, ["a"] * 2049):
        with pytest.raises(ValidationError):
            inputs(bad)
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"input": "x", "encoding_format": "hex"})


def test_embedding_response_float_and_base64_agree() -> None:
    vecs = [np.array([0.6, 0.8, 0.0], dtype="<f4"), np.array([1.0, 0.0, 0.0], dtype="<f4")]
    out = Embeddings(vectors=[v.tobytes() for v in vecs], prompt_tokens=7)
    f = embedding_response("e", out, "float", None)
    b = embedding_response("e", out, "base64", 3)
    assert f["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and f["model"] == "e"
    for i, v in enumerate(vecs):
        assert f["data"][i]["index"] == i and np.allclose(f["data"][i]["embedding"], v)
        assert np.array_equal(np.frombuffer(base64.b64decode(b["data"][i]["embedding"]), "<f4"), v)
    with pytest.raises(InvalidRequestError, match="3 dimensions") as e:
        embedding_response("e", out, "float", 2)
    assert e.value.param == "dimensions"


def test_readiness_of_several_models() -> None:
    ready = ModelInfo(state="ready", model="a", slots_total=2, slots_busy=1)
    loading = ModelInfo(state="loading", model="b", slots_total=1)
    failed = ModelInfo(state="failed", model="e", reason="file_not_found: gone", detail="/x missing")
    assert merge_infos([ready]) is ready
    m = merge_infos([ready, loading])
    assert (m.state, m.model, m.slots_total, m.slots_busy) == ("loading", "b", 3, 1)
    m = merge_infos([ready, loading, failed])
    assert (m.state, m.reason, m.detail) == ("failed", "e: file_not_found: gone", "e: /x missing")
    assert merge_infos([ready, ready.model_copy(update={"model": "c"})]).state == "ready"
