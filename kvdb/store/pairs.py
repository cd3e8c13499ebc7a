"""FAQ pairs: validation, content hashing, add / list / show / remove.

A pair's identity is the sha256 of its normalised question and answer, so adding the same pair twice is a no-op and
vectors built for it stay valid for as long as its text does. Every add is one transaction: a file goes in whole or
not at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from kvdb.config import StoreConfig
from kvdb.errors import AmbiguousError, ConflictError, NotFoundError, ValidationError
from kvdb.store.db import Store
from kvdb.store.models import Domain, Pair

DOMAIN_RE = re.compile(r"[a-z0-9_]{1,64}")
HASH_PREFIX_RE = re.compile(r"[0-9a-f]{1,64}")
_WS = re.compile(r"\s+")
_CHUNK = 500  # keeps IN (...) lists under SQLite's variable limit


def normalise(text: str) -> str:
    """The form that identity is computed on: NFC, whitespace runs collapsed, ends trimmed. Case is kept."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def pair_hash(question: str, answer: str) -> str:
    payload = json.dumps([normalise(question), normalise(answer)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def question_key(question: str) -> str:
    return hashlib.sha256(normalise(question).casefold().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PairInput:
    domain: str
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line" for error messages

    @property
    def hash(self) -> str:
        return pair_hash(self.question, self.answer)


def _json_depth(value: Any) -> int:
    """Depth of nested containers, computed without recursion so a hostile document cannot blow the stack."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return depth


def _check_text(name: str, value: Any, limit: int, where: str) -> None:
    if not isinstance(value, str):
        raise ValidationError(f"{where}{name} must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{where}{name} is empty")
    if "\x00" in value:
        raise ValidationError(f"{where}{name} contains a NUL byte")
    if len(value) > limit:
        raise ValidationError(f"{where}{name} is {len(value)} characters, over the limit of {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{where}{name} is not valid UTF-8 text") from None


def check_domain(name: Any, where: str = "") -> str:
    if not isinstance(name, str) or not DOMAIN_RE.fullmatch(name):
        raise ValidationError(
            f"{where}domain {name!r} is not a valid name: use 1-64 characters of a-z, 0-9 and _"
        )
    return name


def validate(item: PairInput, limits: StoreConfig) -> PairInput:
    where = f"{item.where}: " if item.where else ""
    check_domain(item.domain, where)
    _check_text("question", item.question, limits.max_question_chars, where)
    _check_text("answer", item.answer, limits.max_answer_chars, where)
    if not isinstance(item.metadata, dict):
        raise ValidationError(f"{where}metadata must be an object")
    if _json_depth(item.metadata) > limits.max_metadata_depth:
        raise ValidationError(f"{where}metadata is nested deeper than {limits.max_metadata_depth} levels")
    try:
        encoded = json.dumps(item.metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise ValidationError(f"{where}metadata is not plain JSON ({exc})") from None
    if len(encoded) > limits.max_metadata_bytes:
        raise ValidationError(
            f"{where}metadata is {len(encoded)} bytes, over the limit of {limits.max_metadata_bytes}"
        )
    if "\x00" in encoded.decode("utf-8"):
        raise ValidationError(f"{where}metadata contains a NUL byte")
    return item


@dataclass
class AddReport:
    added: int = 0
    skipped: int = 0
    replaced: int = 0
    hashes: list[str] = field(default_factory=list)  # the stored hash of every input, in input order

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "skipped": self.skipped, "replaced": self.replaced}


def _chunks(seq: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _domain_ids(session: Session, names: set[str], descriptions: dict[str, str] | None = None) -> dict[str, int]:
    existing = dict(session.execute(select(Domain.name, Domain.id).where(Domain.name.in_(names))).all())
    for name in sorted(names - existing.keys()):
        row = Domain(name=name, description=(descriptions or {}).get(name, ""))
        session.add(row)
        session.flush()
        existing[name] = row.id
    return existing


def add_pairs(
    store: Store,
    items: Sequence[PairInput],
    limits: StoreConfig,
    replace: bool = False,
    descriptions: dict[str, str] | None = None,
    after: Callable[[Session], None] | None = None,
) -> AddReport:
    """Add pairs in one transaction. Identical pairs are skipped; a new answer to a stored question (same domain)
    is refused unless ``replace``. Nothing is written if any item is refused. ``after(session)`` runs inside the
    same transaction (e.g. to add the pairs' vectors on import)."""
    for item in items:
        validate(item, limits)
    report = AddReport()
    if not items:
        return report
    hashes = [item.hash for item in items]
    with store.write() as session:
        domain_ids = _domain_ids(session, {item.domain for item in items}, descriptions)
        stored: set[str] = set()
        for chunk in _chunks(list(set(hashes))):
            stored.update(session.scalars(select(Pair.hash).where(Pair.hash.in_(chunk))))
        qkeys = {(domain_ids[item.domain], question_key(item.question)) for item in items}
        by_question: dict[tuple[int, str], Pair] = {}
        for domain_id in {k[0] for k in qkeys}:
            keys = [k[1] for k in qkeys if k[0] == domain_id]
            for chunk in _chunks(keys):
                rows = session.scalars(
                    select(Pair).where(Pair.domain_id == domain_id, Pair.question_key.in_(chunk))
                )
                by_question.update({(r.domain_id, r.question_key): r for r in rows})
        for item, h in zip(items, hashes):
            if h in stored:
                report.skipped += 1
                continue
            key = (domain_ids[item.domain], question_key(item.question))
            old = by_question.get(key)
            if old is not None:
                if not replace:
                    where = f"{item.where}: " if item.where else ""
                    raise ConflictError(
                        f"{where}the question {_short(item.question)!r} in domain '{item.domain}' already has a "
                        f"different answer (pair {old.hash[:12]}); use --replace to change it"
                    )
                session.delete(old)  # cascades to its vectors, embeddings and answers
                session.flush()
                stored.discard(old.hash)
                report.replaced += 1
            else:
                report.added += 1
            row = Pair(
                hash=h,
                domain_id=key[0],
                question=item.question,
                answer=item.answer,
                question_key=key[1],
                meta=item.metadata,
            )
            session.add(row)
            session.flush()
            by_question[key] = row
            stored.add(h)
        report.hashes = hashes
        if after is not None:
            after(session)
        if report.added or report.replaced or after is not None:
            store.bump_revision(session)
    return report


def _short(text: str, n: int = 60) -> str:
    text = normalise(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def pair_dict(pair: Pair) -> dict[str, Any]:
    return {
        "hash": pair.hash,
        "domain": pair.domain.name,
        "question": pair.question,
        "answer": pair.answer,
        "metadata": pair.meta or {},
        "created_at": pair.created_at.isoformat() if pair.created_at else None,
        "updated_at": pair.updated_at.isoformat() if pair.updated_at else None,
    }


def domain_id(session: Session, name: str) -> int:
    check_domain(name)
    found = session.scalar(select(Domain.id).where(Domain.name == name))
    if found is None:
        known = ", ".join(session.scalars(select(Domain.name).order_by(Domain.name))) or "none yet"
        raise NotFoundError(f"no domain named '{name}' (known: {known})")
    return found


def list_pairs(session: Session, domain: str | None = None) -> list[Pair]:
    query = select(Pair).order_by(Pair.id)
    if domain is not None:
        query = query.where(Pair.domain_id == domain_id(session, domain))
    return list(session.scalars(query))


def find_pair(session: Session, prefix: str) -> Pair:
    """The one pair whose hash starts with ``prefix``."""
    prefix = prefix.strip().lower()
    if not HASH_PREFIX_RE.fullmatch(prefix):
        raise ValidationError(f"{prefix!r} is not a hash prefix: use the hex digits `kvdb list` shows")
    rows = list(session.scalars(select(Pair).where(Pair.hash.like(prefix + "%")).limit(6)))
    if not rows:
        raise NotFoundError(f"no pair has a hash starting with {prefix}")
    if len(rows) > 1:
        shown = ", ".join(r.hash[:12] for r in rows[:5])
        raise AmbiguousError(f"hash prefix {prefix} matches several pairs ({shown}…); give more characters")
    return rows[0]


def remove_pairs(store: Store, prefixes: Sequence[str]) -> list[str]:
    """Remove the pairs named by hash prefixes; all prefixes must resolve or nothing is removed."""
    with store.write() as session:
        hashes = sorted({find_pair(session, p).hash for p in prefixes})
        for chunk in _chunks(hashes):
            session.execute(delete(Pair).where(Pair.hash.in_(chunk)))
        if hashes:
            store.bump_revision(session)
    return hashes


def remove_domain(store: Store, name: str) -> list[str]:
    """Remove every pair of a domain, and the domain itself."""
    with store.write() as session:
        did = domain_id(session, name)
        hashes = list(session.scalars(select(Pair.hash).where(Pair.domain_id == did).order_by(Pair.id)))
        session.execute(delete(Pair).where(Pair.domain_id == did))
        session.execute(delete(Domain).where(Domain.id == did))
        store.bump_revision(session)
    return hashes


def domain_counts(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Domain.name, Domain.description, func.count(Pair.id))
        .outerjoin(Pair, Pair.domain_id == Domain.id)
        .group_by(Domain.id)
        .order_by(Domain.name)
    ).all()
    return [{"name": n, "description": d, "count": c} for n, d, c in rows]
