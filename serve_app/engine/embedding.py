"""Pooled embeddings over llama.cpp: one context with ``embeddings`` on, many inputs per ``llama_decode``.

Each input is its own sequence id in the batch and comes back as ``llama_get_embeddings_seq`` (the context pools
it: mean, CLS or last token). Two facts of llama.cpp shape this module:

* pooling happens per micro-batch, so every token of a sequence must sit in the same ubatch. A non-unified KV
  splits a multi-sequence batch into equal-length ubatches and the longer inputs would be pooled over their tail
  only (measured: batched and one-by-one vectors then differ). The context is therefore unified, and
  ``n_ubatch == n_batch`` holds a whole batch;
* nothing is generated, so the KV is cleared before each batch and there is no scheduler: calls run one at a
  time on one thread (a lock), each as few decodes as its inputs need.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serve_app.config import EngineConfig
from serve_app.errors import ContextOverflowError, EngineError, InvalidRequestError, ModelLoadError

from .llama import LlamaModelHandle, gpu_offload_supported, lib

Pooling = Literal["model", "mean", "cls", "last"]


@dataclass(frozen=True)
class EmbeddingReport:
    plan: dict[str, Any]
    on_gpu: bool


class EmbeddingEngine:
    """Embeds token lists: ``n_ctx_seq`` tokens per input at most (``engine.n_ctx_per_slot``), up to ``n_seq_max``
    inputs (``engine.n_parallel``) and ``n_batch`` tokens (``engine.n_batch``, at least one whole input) per
    decode."""

    def __init__(self, model: LlamaModelHandle, cfg: EngineConfig, pooling: Pooling, normalize: bool) -> None:
        L = lib()
        self.model = model
        self.normalize = normalize
        self.n_ctx_seq = cfg.n_ctx_per_slot
        if model.n_ctx_train:
            self.n_ctx_seq = min(self.n_ctx_seq, model.n_ctx_train)
        self.n_seq_max = cfg.n_parallel
        # One decode holds up to n_batch tokens (at least one whole input), in one ubatch: the compute buffer grows
        # with it (attention is n_ubatch x n_ctx), and the KV only ever holds one batch (it is cleared between).
        # llama.cpp aborts (a mul_mat shape assert) when n_ctx is not a multiple of n_seq_max: round up.
        self.n_batch = -(-max(cfg.n_batch, self.n_ctx_seq) // self.n_seq_max) * self.n_seq_max
        cp = L.llama_context_default_params()
        cp.embeddings = True
        cp.pooling_type = {"model": L.LLAMA_POOLING_TYPE_UNSPECIFIED, "mean": L.LLAMA_POOLING_TYPE_MEAN,
                           "cls": L.LLAMA_POOLING_TYPE_CLS, "last": L.LLAMA_POOLING_TYPE_LAST}[pooling]
        cp.n_seq_max = self.n_seq_max
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_batch
        cp.kv_unified = True  # see the module docstring: pooling needs each sequence whole in one ubatch
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[cfg.flash_attn]
        cp.n_threads = cp.n_threads_batch = cfg.n_threads or os.cpu_count() or 1
        cp.no_perf = True
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise ModelLoadError("llama.cpp could not create an embedding context")
        model._acquire()
        if int(L.llama_pooling_type(self.ptr)) == L.LLAMA_POOLING_TYPE_NONE:
            # The GGUF declares no pooling: ask for mean (what a generative model's embeddings mean most often).
            L.llama_free(self.ptr)
            cp.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            self.ptr = L.llama_init_from_model(model.ptr, cp)
            if not self.ptr:
                model._release()
                raise ModelLoadError("llama.cpp could not create an embedding context")
        self.pooling = int(L.llama_pooling_type(self.ptr))
        self.n_embd = int(L.llama_model_n_embd(model.ptr))
        self.dead: str | None = None  # the interface LlamaModel's loader checks; this engine has no thread to die
        self._lock = threading.Lock()
        self._batch = L.llama_batch_init(self.n_batch, 0, self.n_seq_max)

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One float32 vector per input, in order. Blocking: call it off the event loop."""
        for i, toks in enumerate(inputs):
            if not toks:
                raise InvalidRequestError(f"input {i} is empty", param="input")
            if len(toks) > self.n_ctx_seq:
                raise ContextOverflowError(f"input {i} has {len(toks)} tokens; this model embeds at most "
                                           f"{self.n_ctx_seq} per input", param="input")
            if not all(self.model.valid_token(t) for t in toks):
                raise InvalidRequestError(f"input {i} holds a token id outside the vocabulary", param="input")
        out: list[np.ndarray] = []
        with self._lock:
            if not self.ptr:
                raise EngineError("the embedding engine is closed")
            for group in self._groups(inputs):
                out.extend(self._decode(group))
        return out

    def _groups(self, inputs: list[list[int]]) -> list[list[list[int]]]:
        groups: list[list[list[int]]] = [[]]
        used = 0
        for toks in inputs:
            if groups[-1] and (len(groups[-1]) == self.n_seq_max or used + len(toks) > self.n_batch):
                groups.append([])
                used = 0
            groups[-1].append(toks)
            used += len(toks)
        return groups

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        L = lib()
        L.llama_memory_clear(L.llama_get_memory(self.ptr), True)
        b, i = self._batch, 0
        for seq, toks in enumerate(group):
            for pos, t in enumerate(toks):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, 1, 1
                b.seq_id[i][0] = seq
                i += 1
        b.n_tokens = i
        rc = int(L.llama_decode(self.ptr, b))
        if rc != 0:
            raise EngineError(f"llama_decode failed for an embedding batch (code {rc})")
        vecs = []
        for seq in range(len(group)):
            ptr = L.llama_get_embeddings_seq(self.ptr, seq)
            if not ptr:
                raise EngineError("llama.cpp returned no pooled embedding")
            v = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float32, copy=True)
            if self.normalize:
                norm = float(np.linalg.norm(v))
                v = v / norm if norm > 0 else v
            vecs.append(v)
        return vecs

    def stats(self) -> None:
        return None

    def shutdown(self) -> None:
        with self._lock:
            if self.ptr:
                L = lib()
                L.llama_batch_free(self._batch)
                L.llama_free(self.ptr)
                self.ptr = None
                self.model._release()


def load_embedding_engine(path: str, cfg: EngineConfig, *, want_gpu: bool, pooling: Pooling,
                          normalize: bool) -> tuple[EmbeddingEngine, LlamaModelHandle, EmbeddingReport]:
    on_gpu = want_gpu and gpu_offload_supported()
    layers = cfg.n_gpu_layers if on_gpu else 0
    extra = cfg.use_extra_bufts if cfg.use_extra_bufts is not None else on_gpu
    model = LlamaModelHandle(path, layers, extra)
    try:
        engine = EmbeddingEngine(model, cfg, pooling, normalize)
    except BaseException:
        model.close()
        raise
    plan = {"n_parallel": engine.n_seq_max, "n_ctx_per_slot": engine.n_ctx_seq, "n_batch": engine.n_batch,
            "pooling": engine.pooling, "n_embd": engine.n_embd, "n_gpu_layers": layers}
    return engine, model, EmbeddingReport(plan=plan, on_gpu=on_gpu)
