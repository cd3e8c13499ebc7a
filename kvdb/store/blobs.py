"""Tensors <-> safetensors bytes, with a sha256 over the bytes so a flipped byte is caught on read.

safetensors holds raw little-endian data and a JSON header: it cannot run code when read, unlike a pickle.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvdb.errors import CorruptError


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    """Serialise named tensors; returns (bytes, sha256 hex)."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return data, checksum(data)


def unpack(data: bytes, expected_checksum: str | None, what: str) -> dict[str, torch.Tensor]:
    """Deserialise after checking the checksum; ``what`` names the blob in the error (e.g. "vectors of pair ab12")."""
    if expected_checksum is not None and checksum(data) != expected_checksum:
        raise CorruptError(f"{what} fail their checksum (stored bytes were changed); run `kvdb doctor --repair`")
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptError(f"{what} cannot be decoded ({exc}); run `kvdb doctor --repair`") from None
