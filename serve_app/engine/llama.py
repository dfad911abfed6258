"""Thin, typed access to llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Model and context creation, tokenization, metadata and sampler chains. ``llama_cpp`` is imported on first use, not
when this module is imported, so the rest of the service can name these types without loading the native library.
Everything that touches a ``llama_context`` runs on the engine thread; vocab-only calls (tokenize, detokenize) are
thread-safe.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

import numpy as np

from serve_app.errors import ModelLoadError, OutOfMemoryError
from serve_app.protocol import SamplingParams

from .plan import GGML_TYPES, ContextPlan

log = logging.getLogger("serve_app.engine")

_backend_once = threading.Lock()
_backend_ready = False
_log_cb: Any = None  # must stay referenced: llama.cpp calls it from C (a collected callback segfaults)
_lib: Any = None


def lib() -> Any:
    """The ``llama_cpp`` module, imported the first time something needs it."""
    global _lib
    if _lib is None:
        import llama_cpp

        _lib = llama_cpp
    return _lib


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs to Python logging (warnings and up)."""
    global _backend_ready, _log_cb
    with _backend_once:
        if _backend_ready:
            return
        L = lib()
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
    return bool(lib().llama_supports_gpu_offload())


class LlamaModelHandle:
    """A loaded model (weights): shareable, read-only after load.

    Contexts made from it hold a reference: ``close`` while one is still open (its engine thread may still be
    running) defers freeing the weights until the last context closes, so nothing is freed under a live thread.
    """

    def __init__(self, path: str, n_gpu_layers: int, use_extra_bufts: bool, vocab_only: bool = False) -> None:
        init_backend()
        L = lib()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.use_extra_bufts = use_extra_bufts
        mp.vocab_only = vocab_only
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        self._users = 0
        self._close_pending = False
        self._lock = threading.Lock()
        self.ptr = L.llama_model_load_from_file(path.encode(), mp)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load the model file {os.path.basename(path)}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self._to_piece, self._is_eog = L.llama_token_to_piece, L.llama_vocab_is_eog  # per token: skip the lookups
        self._pieces: dict[int, bytes] = {}
        self._pieces_special: dict[int, bytes] = {}
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
        self.n_swa = int(L.llama_model_n_swa(self.ptr))  # the sliding window of its SWA layers; 0: none

    def close(self) -> None:
        with self._lock:
            if self._users:
                self._close_pending = True
                log.warning("model close deferred: %d context(s) still use it", self._users)
                return
            self._free()

    def _acquire(self) -> None:
        with self._lock:
            self._users += 1

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._users and self._close_pending:
                self._free()

    def _free(self) -> None:
        if self.ptr:
            lib().llama_model_free(self.ptr)
            self.ptr = None

    # ---- metadata ------------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        L = lib()
        buf = ctypes.create_string_buffer(1 << 16)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        ptr = lib().llama_model_chat_template(self.ptr, None)
        return ptr.decode("utf-8", "replace") if ptr else None

    # ---- tokens --------------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        L = lib()
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
        # Filled as tokens are seen (at most one small entry per vocabulary token): every generated token and every
        # detokenized id is a dict lookup instead of a buffer allocation and a C call. Dict reads and writes are
        # atomic, so the engine thread and the prompt pool share it safely.
        cache = self._pieces_special if special else self._pieces
        out = cache.get(token)
        if out is None:
            buf = ctypes.create_string_buffer(64)
            n = self._to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._to_piece(self.vocab, token, buf, len(buf), 0, special)
            out = cache[token] = buf.raw[:n]
        return out

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self.vocab, token))

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab


class LlamaContextHandle:
    """One ``llama_context`` with ``n_parallel`` sequences: independent KV streams, or one shared pool (unified)."""

    def __init__(self, model: LlamaModelHandle, plan: ContextPlan, n_threads: int) -> None:
        L = lib()
        cp = L.llama_context_default_params()
        cp.n_seq_max = plan.n_parallel
        cp.n_ctx = plan.n_parallel * plan.n_ctx_per_slot
        cp.n_batch = plan.n_batch
        cp.n_ubatch = plan.n_ubatch
        # Non-unified by default: measured 3x faster decode at long contexts when prefixes are not shared.
        cp.kv_unified = plan.kv_unified
        # Off (llama-server's default): SWA layers keep a window-sized cache instead of a full one per slot.
        cp.swa_full = plan.swa_full
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[plan.flash_attn]
        cp.type_k = GGML_TYPES[plan.kv_type]
        # A quantised V cache needs flash attention; without it keep V in f16 rather than failing.
        cp.type_v = GGML_TYPES[plan.kv_type] if plan.flash_attn != "off" else GGML_TYPES["f16"]
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise OutOfMemoryError(
                f"llama.cpp could not create a context for {plan.n_parallel} slots x {plan.n_ctx_per_slot} tokens "
                f"(n_batch {plan.n_batch}, kv {plan.kv_type}, gpu layers {plan.n_gpu_layers})"
            )
        self.model = model
        model._acquire()
        self.mem = L.llama_get_memory(self.ptr)
        self._decode, self._get_logits = L.llama_decode, L.llama_get_logits  # per step: skip the lookups
        self.n_seq_max = int(L.llama_n_seq_max(self.ptr))
        self.n_ctx = int(L.llama_n_ctx(self.ptr))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(self.ptr))
        self.n_batch = int(L.llama_n_batch(self.ptr))
        # The window a cached prefix must still hold to be reused (see prefix.py); 0 when every layer keeps all.
        self.n_swa = 0 if plan.swa_full else model.n_swa

    def close(self) -> None:
        if self.ptr:
            lib().llama_free(self.ptr)
            self.ptr = None
            self.model._release()

    def decode(self, batch: Any) -> int:
        return int(self._decode(self.ptr, batch))

    def all_logits(self, n_outputs: int, n_vocab: int) -> np.ndarray:
        """Zero-copy (n_outputs, n_vocab) view of the last decode's logits; valid until the next decode."""
        return np.ctypeslib.as_array(self._get_logits(self.ptr), shape=(n_outputs, n_vocab))

    def row_logits(self, i_batch: int, n_vocab: int) -> np.ndarray:
        """Zero-copy view of the logits of batch token ``i_batch``; valid until the next decode."""
        return np.ctypeslib.as_array(lib().llama_get_logits_ith(self.ptr, i_batch), shape=(n_vocab,))

    def free_seq(self, seq: int) -> None:
        if self.ptr:
            lib().llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_rm_tail(self, seq: int, n_keep: int) -> bool:
        """Drop ``seq``'s KV from position ``n_keep`` on; False when the memory cannot (recurrent state)."""
        return bool(lib().llama_memory_seq_rm(self.mem, seq, n_keep, -1)) if self.ptr else False

    def seq_pos_min(self, seq: int) -> int:
        """The first position ``seq`` still holds (after a sliding window dropped older ones); -1 when none."""
        return int(lib().llama_memory_seq_pos_min(self.mem, seq)) if self.ptr else -1

    def seq_pos_max(self, seq: int) -> int:
        """The last position ``seq`` holds in the KV cache; -1 when none (or once the context is freed)."""
        return int(lib().llama_memory_seq_pos_max(self.mem, seq)) if self.ptr else -1

    def seq_state(self, seq: int, flags: int = 0) -> bytes:
        """A copy of ``seq``'s state (its KV cells; ``flags`` 1: only the SWA / recurrent part) in host memory."""
        L = lib()
        size = int(L.llama_state_seq_get_size_ext(self.ptr, seq, flags))
        buf = (ctypes.c_uint8 * size)()
        n = int(L.llama_state_seq_get_data_ext(self.ptr, buf, size, seq, flags))
        return bytes(memoryview(buf)[:n])

    def set_seq_state(self, seq: int, data: bytes, flags: int = 0) -> bool:
        """Load a ``seq_state`` copy into ``seq``; False when llama.cpp could not (no room in a unified KV)."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(lib().llama_state_seq_set_data_ext(self.ptr, buf, len(data), seq, flags)) > 0


class SamplerChain:
    """llama.cpp's own sampler chain for one request (top-k before penalties: penalties are slow on a full
    vocabulary). ``llama_sampler_sample`` accepts the token it returns, so nothing else feeds the chain."""

    def __init__(self, model: LlamaModelHandle, p: SamplingParams, seed: int) -> None:
        L = lib()
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        self._sample = L.llama_sampler_sample
        self._cands: Any = None  # candidates for ``pick`` (grammar-constrained requests only)
        add = lambda s: L.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        # The chain's first cut: it only ever looks at the ``top_k`` most likely tokens (0: at all of them).
        self.top_k = (max(p.top_k, 64) if p.top_k else 64) if p.greedy else p.top_k
        if p.greedy:
            if p.penalised:
                add(L.llama_sampler_init_top_k(self.top_k))
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

    def sample(self, ctx: LlamaContextHandle, i_batch: int) -> int:
        return int(self._sample(self.ptr, ctx.ptr, i_batch))

    def pick(self, ids: np.ndarray, logits: np.ndarray) -> int:
        """The chain's choice among these candidates, without accepting it (a grammar may still refuse it)."""
        from .grammar import TokenArray

        if self._cands is None or len(self._cands.buf) < len(ids):
            self._cands = TokenArray(len(ids))
        self._cands.load(ids, logits)
        lib().llama_sampler_apply(self.ptr, self._cands.ptr)
        return self._cands.selected_id()

    def accept(self, tok: int) -> None:
        lib().llama_sampler_accept(self.ptr, tok)

    def close(self) -> None:
        if self.ptr:
            lib().llama_sampler_free(self.ptr)
            self.ptr = None
