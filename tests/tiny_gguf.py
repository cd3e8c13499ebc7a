"""A tiny random Llama written as a GGUF file, so the llama.cpp engine is tested without the embedded model.

The vocabulary is a SentencePiece-style ("llama") one that llama.cpp loads: <unk>, <s>, </s>, the 256 byte tokens
(<0x00>..<0xFF>, so any text tokenizes) and a few word pieces. Weights are f32, drawn from a seeded generator with
scales that make the logits spread over many tokens, so greedy continuations wander instead of repeating one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORDS = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by", "at",
         "model", "token", "cache", "answer", "question", "fast", "exact", "state", "prefix", "draft"]


@dataclass(frozen=True)
class TinyLlama:
    """Shape of the tiny model; ``seed`` decides every weight."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 512
    seed: int = 0


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, SentencePiece scores and token types (1 normal, 2 unknown, 3 control, 6 byte)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in WORDS]
    pieces = [f"\u2581{w}" for w in WORDS] + WORDS + letters + ["\u2581"]  # every token string distinct
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def _tensors(shape: TinyLlama, n_vocab: int) -> dict[str, np.ndarray]:
    """Weights as numpy arrays in PyTorch layout ([out, in]); the writer stores them in ggml's order."""
    rng = np.random.default_rng(shape.seed)
    d, hd = shape.n_embd, shape.n_embd // shape.n_head

    def w(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((out, inp)) * gain / np.sqrt(inp)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    out = {"token_embd.weight": rng.standard_normal((n_vocab, d)).astype(np.float32)}
    for i in range(shape.n_layer):
        out |= {
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": w(shape.n_head * hd, d, 2.0),
            f"blk.{i}.attn_k.weight": w(shape.n_head_kv * hd, d, 2.0),
            f"blk.{i}.attn_v.weight": w(shape.n_head_kv * hd, d),
            f"blk.{i}.attn_output.weight": w(d, shape.n_head * hd),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": w(shape.n_ff, d),
            f"blk.{i}.ffn_up.weight": w(shape.n_ff, d),
            f"blk.{i}.ffn_down.weight": w(d, shape.n_ff),
        }
    out["output_norm.weight"] = norm()
    out["output.weight"] = w(n_vocab, d, 4.0)
    return out


def write_tiny_gguf(path: Path, shape: TinyLlama = TinyLlama()) -> Path:
    """Write the tiny model to ``path`` (deterministic for a given shape and seed) and return the path."""
    import gguf

    tokens, scores, types = vocabulary()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-seed{shape.seed}")
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    for name, array in _tensors(shape, len(tokens)).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
