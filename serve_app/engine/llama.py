"""Thin, typed access to llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Model and context creation, tokenization, metadata and sampler chains. Everything that touches a
``llama_context`` must run on the engine thread; vocab-only calls (tokenize, detokenize) are thread-safe.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import llama_cpp as L
import numpy as np

from serve_app.config import EngineConfig
from serve_app.errors import ModelLoadError, OutOfMemoryError
from serve_app.protocol import SamplingParams

log = logging.getLogger("serve_app.engine")

_backend_once = threading.Lock()
_backend_ready = False
_log_cb: Any = None  # must stay referenced: llama.cpp calls it from C (a collected callback segfaults)

_GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
_FLASH = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
          "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs to Python logging (warnings and up)."""
    global _backend_ready, _log_cb
    with _backend_once:
        if _backend_ready:
            return
        L.llama_backend_init()

        @L.llama_log_callback
        def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            # This ggml build numbers levels NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (measured: the
            # loader's info lines arrive as 2), unlike llama_cpp/_logger.py's table.
            if level in (3, 4) and text:
                msg = text.decode("utf-8", "replace").rstrip()
                if msg:
                    log.log(logging.WARNING if level == 3 else logging.ERROR, "llama.cpp: %s", msg)

        _log_cb = _cb
        L.llama_log_set(_log_cb, ctypes.c_void_p(0))
        _backend_ready = True


def gpu_offload_supported() -> bool:
    init_backend()
    return bool(L.llama_supports_gpu_offload())


@dataclass(frozen=True)
class ContextPlan:
    """One rung of the memory ladder: what we ask llama.cpp for."""

    n_parallel: int
    n_ctx_per_slot: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    n_gpu_layers: int
    flash_attn: str
    kv_unified: bool = False  # last, with a default: profiles written before it existed still load

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> ContextPlan:
        return cls(cfg.n_parallel, cfg.n_ctx_per_slot, cfg.n_batch, min(cfg.n_ubatch, cfg.n_batch), cfg.kv_type,
                   cfg.n_gpu_layers, cfg.flash_attn, cfg.kv_unified)

    def describe(self) -> dict[str, Any]:
        return dict(self.__dict__)


def memory_ladder(first: ContextPlan, n_layers: int, on_gpu: bool) -> list[ContextPlan]:
    """Successively cheaper plans, each building on the previous one (seed process 4: memory faults).

    Order: fewer slots, smaller n_batch, smaller context per slot, quantised KV, fewer GPU layers. Each step
    roughly halves one consumer, so the ladder is short even from absurd settings.
    """
    plans = [first]
    p = first
    while p.n_parallel > 1:
        p = replace(p, n_parallel=max(1, p.n_parallel // 2))
        plans.append(p)
    while p.n_batch > 64:
        nb = max(64, p.n_batch // 2)
        p = replace(p, n_batch=nb, n_ubatch=min(p.n_ubatch, nb))
        plans.append(p)
    while p.n_ctx_per_slot > 256:
        p = replace(p, n_ctx_per_slot=max(256, p.n_ctx_per_slot // 2))
        plans.append(p)
    for kv in ("q8_0", "q4_0"):
        if _GGML_TYPES[kv] != _GGML_TYPES[p.kv_type] and (p.kv_type, kv) != ("q4_0", "q8_0"):
            p = replace(p, kv_type=kv, flash_attn="on" if on_gpu else p.flash_attn)
            plans.append(p)
    if on_gpu:
        layers = n_layers if p.n_gpu_layers < 0 else p.n_gpu_layers
        while layers > 0:
            layers //= 2
            p = replace(p, n_gpu_layers=layers)
            plans.append(p)
    return plans


class LlamaModelHandle:
    """A loaded model (weights) — shareable, read-only after load."""

    def __init__(self, path: str, n_gpu_layers: int, use_extra_bufts: bool, vocab_only: bool = False) -> None:
        init_backend()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = use_extra_bufts
        mp.vocab_only = vocab_only
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        self.ptr = L.llama_model_load_from_file(path.encode(), mp)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load the model file {os.path.basename(path)}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        if vocab_only:
            # Hyper-parameter getters abort (GGML_ASSERT) on a vocab-only model: read the header keys instead.
            arch = self.meta("general.architecture") or "llama"
            self.n_layer = int(self.meta(f"{arch}.block_count") or 0)
            self.n_ctx_train = int(self.meta(f"{arch}.context_length") or 0)
            return
        self.n_layer = int(L.llama_model_n_layer(self.ptr))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.ptr))
        self.n_embd = int(L.llama_model_n_embd(self.ptr))
        self.n_head = max(1, int(L.llama_model_n_head(self.ptr)))
        self.n_head_kv = int(L.llama_model_n_head_kv(self.ptr)) or self.n_head
        self.size_bytes = int(L.llama_model_size(self.ptr))

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None

    # ---- metadata ------------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        ptr = L.llama_model_chat_template(self.ptr, None)
        return ptr.decode("utf-8", "replace") if ptr else None

    # ---- tokens --------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab


_KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def context_bytes(model: LlamaModelHandle, plan: ContextPlan) -> int:
    """Estimated host/device bytes for a context: the KV cache plus logits and a compute-buffer allowance."""
    kv_dim = model.n_head_kv * (model.n_embd // model.n_head)
    cells = plan.n_parallel * plan.n_ctx_per_slot
    kv = model.n_layer * 2 * kv_dim * cells * _KV_BYTES[plan.kv_type]
    logits = plan.n_batch * model.n_vocab * 4
    compute = plan.n_ubatch * (model.n_embd * 16 + model.n_vocab) * 4
    return int(kv + logits + compute)


class LlamaContextHandle:
    """One ``llama_context`` with ``n_parallel`` sequences: independent KV streams, or one shared pool (unified)."""

    def __init__(self, model: LlamaModelHandle, plan: ContextPlan, n_threads: int) -> None:
        cp = L.llama_context_default_params()
        cp.n_seq_max = plan.n_parallel
        cp.n_ctx = plan.n_parallel * plan.n_ctx_per_slot
        cp.n_batch = plan.n_batch
        cp.n_ubatch = plan.n_ubatch
        # Non-unified by default: measured 3x faster decode at long contexts when prefixes are not shared.
        cp.kv_unified = plan.kv_unified
        cp.flash_attn_type = _FLASH[plan.flash_attn]
        cp.type_k = _GGML_TYPES[plan.kv_type]
        # A quantised V cache needs flash attention; without it keep V in f16 rather than failing.
        cp.type_v = _GGML_TYPES[plan.kv_type] if plan.flash_attn != "off" else _GGML_TYPES["f16"]
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise OutOfMemoryError(
                f"llama.cpp could not create a context for {plan.n_parallel} slots x {plan.n_ctx_per_slot} tokens "
                f"(n_batch {plan.n_batch}, kv {plan.kv_type}, gpu layers {plan.n_gpu_layers})"
            )
        self.mem = L.llama_get_memory(self.ptr)
        self.n_seq_max = int(L.llama_n_seq_max(self.ptr))
        self.n_ctx = int(L.llama_n_ctx(self.ptr))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(self.ptr))
        self.n_batch = int(L.llama_n_batch(self.ptr))

    def close(self) -> None:
        if self.ptr:
            L.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: L.llama_batch) -> int:
        return int(L.llama_decode(self.ptr, batch))

    def all_logits(self, n_outputs: int, n_vocab: int) -> np.ndarray:
        """Zero-copy (n_outputs, n_vocab) view of the last decode's logits; valid until the next decode."""
        return np.ctypeslib.as_array(L.llama_get_logits(self.ptr), shape=(n_outputs, n_vocab))

    def free_seq(self, seq: int) -> None:
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_pos_max(self, seq: int) -> int:
        return int(L.llama_memory_seq_pos_max(self.mem, seq))

    def clear(self) -> None:
        L.llama_memory_clear(self.mem, True)


class SamplerChain:
    """llama.cpp's own sampler chain for one request (top-k before penalties: penalties are slow on a full
    vocabulary)."""

    def __init__(self, model: LlamaModelHandle, p: SamplingParams, seed: int) -> None:
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda s: L.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if p.greedy:
            if p.penalised:
                add(L.llama_sampler_init_top_k(max(p.top_k, 64) if p.top_k else 64))
                add(L.llama_sampler_init_penalties(model.n_vocab, p.repeat_last_n, p.repeat_penalty,
                                                   p.frequency_penalty, p.presence_penalty))
            add(L.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            add(L.llama_sampler_init_top_k(p.top_k))
        if p.penalised:
            add(L.llama_sampler_init_penalties(model.n_vocab, p.repeat_last_n, p.repeat_penalty,
                                               p.frequency_penalty, p.presence_penalty))
        add(L.llama_sampler_init_top_p(p.top_p, 1))
        add(L.llama_sampler_init_min_p(p.min_p, 1))
        add(L.llama_sampler_init_temp(p.temperature))
        add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept(self, token: int) -> None:
        L.llama_sampler_accept(self.ptr, token)

    def sample(self, ctx: LlamaContextHandle, i_batch: int) -> int:
        return int(L.llama_sampler_sample(self.ptr, ctx.ptr, i_batch))

    def close(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None
