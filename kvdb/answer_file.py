"""The home's answer file: the base model's greedy answers to prompts that are not a pair's own question.

One JSON object per model and prompt format under ``KVDB_HOME/checkpoints/base_answers/``, keyed by the sha256 of the
prompt ids: ``{"output": [ids], "finished": bool, "max_new_tokens": int, "pair": hash?}``. ``pair`` names the pair a
rephrasing is about (training's variants, queries retrieval was sure of), whose wording a new rephrasing often
repeats: copies draw on it, and exports carry those answers (``variant_answers``). Answers recorded with a pair's own
question live in the store instead (kvdb.train.AnswerBook).
"""

from __future__ import annotations

import json
from pathlib import Path

from kvdb.errors import StoreError
from kvdb.fileio import atomic_write_bytes
from kvdb.prompt import PROMPT_FORMAT


def answer_file(home, fingerprint: str) -> Path:
    """The home's file of base-model answers to prompts that are not a pair's own question, for one model and the
    current prompt format."""
    return home.checkpoints_dir / "base_answers" / f"{fingerprint[:16]}-{PROMPT_FORMAT}.json"


def read_answer_file(path: Path) -> dict[str, dict]:
    """The answer file's entries by prompt key; an absent or unreadable file has none (answers can be recomputed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_answer_file(path: Path, book: dict[str, dict]) -> None:
    try:
        atomic_write_bytes(path, json.dumps(book).encode())
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}; check that the home is writable") from None


def merge_answer_file(path: Path, entries: dict[str, dict]) -> int:
    """Add the ``entries`` (by prompt key) that the file lacks (answers already there stay); returns how many were
    added."""
    book = read_answer_file(path)
    new = {k: v for k, v in entries.items() if k not in book}
    if new:
        book.update(new)
        write_answer_file(path, book)
    return len(new)


def answers_by_pair(path: Path, per_pair: int = 16) -> dict[str, dict[str, dict]]:
    """The file's answers about each pair: {pair hash: {prompt key: entry}}, the ``per_pair`` latest recorded for
    each."""
    out: dict[str, dict[str, dict]] = {}
    for key, entry in read_answer_file(path).items():
        ok = isinstance(entry, dict) and isinstance(entry.get("pair"), str) and isinstance(entry.get("output"), list)
        ok = ok and all(isinstance(t, int) and 0 <= t < 2**31 for t in entry["output"])
        if ok:
            out.setdefault(entry["pair"], {})[key] = entry
    return {h: dict(list(entries.items())[-per_pair:]) for h, entries in out.items()}
