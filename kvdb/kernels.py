"""How the base model's linear layers multiply in short passes: ``x @ W^T`` as PyTorch does, or ``(W @ x^T)^T``.

A verify pass feeds a few rows (the last token plus the draft) through every linear layer. For 2-8 rows, BLAS
libraries may take a GEMM path that costs more than a one-row pass, while the same product written as
``(W @ x^T)^T`` (weights as the left operand, rows as columns) may cost less; on other processors it is the other
way round. So kvdb.passcost measures both per pass length, and the transformers engine (kvdb.engines.transformers)
runs the transposed form only for the lengths where it won.

Both are the same dot products summed in another order, so logits may differ in their last bits, as they already
do between generate's one-row passes and any multi-row verify pass (kvdb.decode's note on exactness): an argmax can
only flip where the top two logits tie to rounding.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Collection, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def _forward_for(rows: frozenset[int]):
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        n = _rows(x)
        if n not in rows:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(n, x.shape[-1]).t()).t()  # [N, K] @ [K, n] -> [n, N], a transposed view
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


@contextlib.contextmanager
def transposed_rows(model: nn.Module, rows: Collection[int]) -> Iterator[None]:
    """Within the block, the plain ``nn.Linear`` layers of ``model`` compute inputs of exactly ``rows`` rows (batch
    times positions; 2 or more) as ``(W @ x^T)^T``; every other input, and every other module, is untouched."""
    chosen = frozenset(int(r) for r in rows if int(r) >= 2)
    patched: list[nn.Linear] = []
    if chosen:
        forward = _forward_for(chosen)
        for module in model.modules():
            # Subclasses (quantised or LoRA layers) keep their own forward; a forward set on the instance by
            # someone else is left alone too.
            if type(module) is nn.Linear and "forward" not in vars(module):
                module.forward = types.MethodType(forward, module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


__all__ = ["transposed_rows"]
