"""Rows of the ``models`` table: the base models whose vectors or answers the store holds, keyed by fingerprint."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from kvdb.store.models import ModelInfo


def ensure_model(session: Session, fingerprint: str, *, name: str, source: str, hidden_size: int, num_layers: int,
                 info: dict[str, Any]) -> None:
    """Add the model's row unless it is there, inside the caller's write transaction (writers are serialised, so
    the check cannot race), and flush it so rows that refer to it can follow, also as Core inserts."""
    if session.get(ModelInfo, fingerprint) is None:
        session.add(ModelInfo(fingerprint=fingerprint, name=name, source=source, hidden_size=hidden_size,
                              num_layers=num_layers, info=info))
        session.flush()
