"""ORM tables. Identity is content: a pair is its hash; vectors are keyed by (pair hash, model fingerprint).

Blobs are safetensors bytes with a sha256 beside them, so a flipped byte is caught on read. The whole schema is
portable (SQLite and PostgreSQL): LargeBinary, JSON, no dialect-only types.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    pairs: Mapped[list["Pair"]] = relationship(back_populates="domain")


class Pair(Base):
    __tablename__ = "pairs"
    # One answer per question per domain: a new answer must say --replace.
    __table_args__ = (UniqueConstraint("domain_id", "question_key", name="uq_pairs_domain_question"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # also the FAISS id
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="RESTRICT"), index=True)
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    question_key: Mapped[str] = mapped_column(String(64))  # sha256 of the normalised question
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    domain: Mapped[Domain] = relationship(back_populates="pairs", lazy="joined")


class ModelInfo(Base):
    """A base model that made vectors; the fingerprint is dtype- and device-independent."""

    __tablename__ = "models"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text)
    hidden_size: Mapped[int] = mapped_column(Integer)
    num_layers: Mapped[int] = mapped_column(Integer)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PairVectors(Base):
    """Per-token hidden states of one pair under one model: token ids, answer start, the kept layers."""

    __tablename__ = "pair_vectors"
    __table_args__ = (UniqueConstraint("pair_hash", "fingerprint", name="uq_pair_vectors_pair_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_hash: Mapped[str] = mapped_column(ForeignKey("pairs.hash", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(ForeignKey("models.fingerprint", ondelete="CASCADE"), index=True)
    layers: Mapped[list[int]] = mapped_column(JSON)  # resolved 1-based layer numbers, e.g. [3, 30]
    num_tokens: Mapped[int] = mapped_column(Integer)
    answer_start: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: token_ids int32 [T], layer_<L> fp16 [T, H]
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """A retrieval embedding of one pair by one embedder (the embedder's own fingerprint)."""

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("pair_hash", "embedder", name="uq_embeddings_pair_embedder"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_hash: Mapped[str] = mapped_column(ForeignKey("pairs.hash", ondelete="CASCADE"), index=True)
    embedder: Mapped[str] = mapped_column(String(128), index=True)
    dim: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: one or more float32 [dim] vectors
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BaseAnswer(Base):
    """The base model's own greedy answer to a pair's question under one prompt format (distillation target and
    an exact draft source for a question asked again)."""

    __tablename__ = "base_answers"
    __table_args__ = (
        UniqueConstraint("pair_hash", "fingerprint", "prompt_format", name="uq_base_answers_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_hash: Mapped[str] = mapped_column(ForeignKey("pairs.hash", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(ForeignKey("models.fingerprint", ondelete="CASCADE"))
    prompt_format: Mapped[str] = mapped_column(String(64))
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    finished: Mapped[bool] = mapped_column(Boolean)  # ended with EOS before max_new_tokens
    text: Mapped[str] = mapped_column(Text)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: prompt_ids, output_ids int32
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RecordedAnswer(Base):
    """The base model's greedy answer to a prompt other than a pair's own question under retrieval's references
    (a rephrasing, training's variants and extra contexts, a query retrieval was unsure of), keyed by model and the
    sha256 of the exact prompt ids. ``pair_hash`` names the pair the prompt asks about, when known; it is not a
    foreign key, because training records answers about pairs that live only in a cache file."""

    __tablename__ = "recorded_answers"
    __table_args__ = (UniqueConstraint("fingerprint", "prompt_key", name="uq_recorded_answers_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    prompt_key: Mapped[str] = mapped_column(String(64))  # sha256 of the prompt ids as a JSON list
    prompt_format: Mapped[str] = mapped_column(String(64))
    pair_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    finished: Mapped[bool] = mapped_column(Boolean)  # ended with EOS before max_new_tokens
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: output_ids int32
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EngineAnswer(Base):
    """An engine's whole greedy answer to one exact prompt, made on a build whose batched passes compute every row
    like a one-token step (kvdb.replay): returning it for the same prompt ids, engine, build and settings is that
    engine's deterministic greedy output. ``engine_key`` is the sha256 of the engine's ``describe()`` (model
    fingerprint, engine, build, threads, ...); answers of another engine key are never returned."""

    __tablename__ = "engine_answers"
    __table_args__ = (UniqueConstraint("engine_key", "prompt_key", name="uq_engine_answers_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    engine_key: Mapped[str] = mapped_column(String(64), index=True)
    prompt_key: Mapped[str] = mapped_column(String(64))  # sha256 of the prompt ids as a JSON list
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    finished: Mapped[bool] = mapped_column(Boolean)  # ended with EOS before max_new_tokens
    data: Mapped[bytes] = mapped_column(LargeBinary)  # safetensors: output_ids int32
    checksum: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoreState(Base):
    """Small counters; ``revision`` rises with every change to pairs or embeddings, so an index can tell it is
    stale with one read."""

    __tablename__ = "store_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)
