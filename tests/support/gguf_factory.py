"""Write tiny random-weight Llama GGUF models with the ``gguf`` package, for tests and benchmarks.

The vocabulary is synthetic but real: a SentencePiece ("llama") tokenizer with control tokens, the 256 byte
fallback tokens (so any UTF-8 text tokenizes, and multi-byte characters split across tokens), single printable
characters, and every prefix of a few words (so the SPM merge chain builds multi-character tokens and a stop
string can straddle a token boundary). A ChatML chat template is stored in the metadata.

    python -m tests.support.gguf_factory out.gguf --n-layer 12 --n-embd 768 --n-ff 3072
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the quick brown fox jumps over a lazy dog hello world model serve token stream batch cache "
    "llama ray pod user assistant system answer question stop end yes no one two three four five"
).split()

_SPECIALS = [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3)]
BOS_ID, EOS_ID, IM_END_ID = 1, 2, 4


def synthetic_vocab(size: int = 0) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the synthetic SPM vocabulary, padded with filler word pieces up to
    ``size`` tokens when that is larger (what a real 32k-256k vocabulary costs per step: the output matrix, the
    argmax, a grammar mask)."""
    tokens = [t for t, _ in _SPECIALS]
    types = [ty for _, ty in _SPECIALS]
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)  # BYTE
        scores.append(0.0)
    pieces: list[str] = ["\u2581"] + [chr(c) for c in range(33, 127)]
    seen = set(pieces)
    for w in WORDS:
        word = "\u2581" + w
        for i in range(2, len(word) + 1):
            p = word[:i]
            if p not in seen:
                seen.add(p)
                pieces.append(p)
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)  # NORMAL
        # Longer pieces score higher so the SPM merge loop prefers them.
        scores.append(-1000.0 + 10.0 * len(p) - i * 1e-3)
    # Fillers score below every real piece, so the tokenizer never prefers them for the words above.
    for i in range(max(0, size - len(tokens))):
        tokens.append(f"\u2581x{i:x}q")
        types.append(1)
        scores.append(-5000.0 - i * 1e-3)
    return tokens, scores, types


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    ctx: int = 4096
    dtype: str = "f16"
    seed: int = 0
    std: float = 0.2
    out_std: float = 4.0
    chat_template: str | None = CHATML_TEMPLATE
    name: str = "tiny-test"
    vocab_size: int = 0  # 0: the synthetic vocabulary as is (a few hundred tokens); more pads it with fillers
    pooling: str | None = None  # an embedding model: "mean", "cls" or "last" (llama.cpp pools llama-arch models too)


def write_gguf(path: str | os.PathLike[str], spec: ModelSpec = ModelSpec()) -> str:
    """Write the model to ``path`` and return the path. Deterministic for a given spec."""
    path = os.fspath(path)
    tokens, scores, types = synthetic_vocab(spec.vocab_size)
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head
    qt = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}[spec.dtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[spec.dtype]
    rng = np.random.default_rng(spec.seed)

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(spec.name)
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(ftype))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)
    if spec.pooling is not None:
        w.add_pooling_type(gguf.PoolingType[spec.pooling.upper()])

    def mat(name: str, rows: int, cols: int, std: float | None = None) -> None:
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(std or spec.std)
        w.add_tensor(name, x.astype(np.float16) if qt == gguf.GGMLQuantizationType.F16 else x)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", n_vocab, spec.n_embd, 1.0)
    vec("output_norm.weight", spec.n_embd)
    mat("output.weight", n_vocab, spec.n_embd, spec.out_std / np.sqrt(spec.n_embd))
    for i in range(spec.n_layer):
        vec(f"blk.{i}.attn_norm.weight", spec.n_embd)
        mat(f"blk.{i}.attn_q.weight", spec.n_head * head_dim, spec.n_embd)
        mat(f"blk.{i}.attn_k.weight", spec.n_head_kv * head_dim, spec.n_embd)
        mat(f"blk.{i}.attn_v.weight", spec.n_head_kv * head_dim, spec.n_embd)
        mat(f"blk.{i}.attn_output.weight", spec.n_embd, spec.n_head * head_dim)
        vec(f"blk.{i}.ffn_norm.weight", spec.n_embd)
        mat(f"blk.{i}.ffn_gate.weight", spec.n_ff, spec.n_embd)
        mat(f"blk.{i}.ffn_up.weight", spec.n_ff, spec.n_embd)
        mat(f"blk.{i}.ffn_down.weight", spec.n_embd, spec.n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BENCH_SPEC = ModelSpec(n_layer=12, n_embd=768, n_head=12, n_head_kv=4, n_ff=4096, ctx=4096, name="bench-150m")
# The same shape with a 32,000-token vocabulary, for workloads whose per-step cost grows with the vocabulary.
BENCH_SPEC_32K = ModelSpec(n_layer=12, n_embd=768, n_head=12, n_head_kv=4, n_ff=4096, ctx=4096, vocab_size=32000,
                           name="bench-150m-32k")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-ff", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    spec = ModelSpec(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, n_head_kv=a.n_head_kv, n_ff=a.n_ff,
                     seed=a.seed)
    print(write_gguf(a.out, spec))


if __name__ == "__main__":
    main()
