"""Invariant: the embedding engine gives each input the same vector whether it is embedded alone, in one batch
with inputs of other lengths, or in a request split over several decodes (more inputs than sequences, or more
of them at the context's length); vectors are L2-normalised when asked and raw otherwise; an input over the context
or with a token outside the vocabulary is refused before any decode. Real llama.cpp on a tiny mean-pooling GGUF.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serve_app.config import EngineConfig
from serve_app.engine.embedding import EmbeddingEngine, load_embedding_engine
from serve_app.errors import ContextOverflowError, InvalidRequestError
from tests.support.gguf_factory import ModelSpec, write_gguf


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddingEngine]:
    path = write_gguf(Path(tmp_path_factory.mktemp("embed")) / "e.gguf", ModelSpec(pooling="mean", seed=5))
    eng, model, report = load_embedding_engine(path, EngineConfig(n_parallel=3, n_ctx_per_slot=64, n_batch=100,
                                                            n_ubatch=100, n_threads=1),
                                               want_gpu=False, pooling="model", normalize=True)
    assert report.plan["pooling"] == 1 and report.plan["n_embd"] == 64  # mean, from the GGUF
    yield eng
    eng.shutdown()
    model.close()


def test_batched_vectors_equal_one_by_one(engine: EmbeddingEngine) -> None:
    inputs = [engine.model.tokenize(t, True, False) for t in
              ("hello", "the quick brown fox jumps", "one two", "yes no yes no yes no", "a")]
    alone = [engine.embed([x])[0] for x in inputs]
    together = engine.embed(inputs)  # 5 inputs, 3 sequences per decode: two decodes
    # F16 on a CPU: a batch of another shape takes another matmul kernel (~1e-4 noise), hence the tolerance
    for a, b in zip(alone, together, strict=True):
        assert np.allclose(a, b, atol=1e-3)
        assert abs(float(np.linalg.norm(b)) - 1.0) < 1e-5
    assert not np.allclose(together[0], together[1])
    # whole contexts beside a short one: ~100 tokens per decode splits them [64, short], [64]
    full = [(inputs[1] * 20)[:64], inputs[0], (inputs[3] * 20)[:64]]
    assert [len(g) for g in engine._groups(full)] == [2, 1]
    for a, b in zip(engine.embed(full), [engine.embed([x])[0] for x in full], strict=True):
        assert np.allclose(a, b, atol=1e-3)


def test_limits_are_checked_before_any_decode(engine: EmbeddingEngine) -> None:
    with pytest.raises(ContextOverflowError, match="input 1 has 65 tokens"):
        engine.embed([[5], [5] * 65])
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.embed([[engine.model.n_vocab]])
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.embed([[]])


def test_raw_vectors_when_normalize_is_off(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "e.gguf", ModelSpec(pooling="mean", seed=5))
    eng, model, _ = load_embedding_engine(path, EngineConfig(n_parallel=1, n_ctx_per_slot=64, n_threads=1),
                                          want_gpu=False, pooling="cls", normalize=False)
    try:
        assert eng.pooling == 2  # the entry's pooling wins over the GGUF's
        v = eng.embed([model.tokenize("hello world", True, False)])[0]
        assert abs(float(np.linalg.norm(v)) - 1.0) > 1e-3
    finally:
        eng.shutdown()
        model.close()
