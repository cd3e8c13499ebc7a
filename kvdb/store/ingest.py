"""Read FAQ pairs from JSONL or CSV (a path or ``-`` for stdin) into validated ``PairInput`` items.

The whole file is parsed and validated before anything is written, so a bad line 9000 leaves the store untouched;
errors name the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from kvdb.config import StoreConfig
from kvdb.errors import NotFoundError, ValidationError
from kvdb.store.pairs import PairInput, validate

# Fields that `kvdb list --json` prints but that are derived, so a listing can be fed back in as it is.
_DERIVED = {"hash", "created_at", "updated_at"}


def read_source(path: str) -> tuple[str, str]:
    """Return (display name, decoded text). Invalid UTF-8 is an error, never replaced silently."""
    if path == "-":
        name, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        p = Path(path)
        name = str(p)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"file {name} does not exist") from None
        except IsADirectoryError:
            raise ValidationError(f"{name} is a folder, not a file") from None
        except OSError as exc:
            raise ValidationError(f"cannot read {name}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValidationError(f"{name}:{line}: not valid UTF-8 (byte {exc.start})") from None
    return name, text.removeprefix("\ufeff")


def _detect(name: str, text: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "jsonl" if text.lstrip().startswith("{") else "csv"


def _from_record(record: dict[str, Any], default_domain: str | None, where: str) -> PairInput:
    missing = [k for k in ("question", "answer") if k not in record]
    if missing:
        raise ValidationError(f"{where}: missing field {' and '.join(repr(m) for m in missing)}")
    domain = record.get("domain", default_domain)
    if domain is None or domain == "":
        raise ValidationError(f"{where}: no domain (add a 'domain' field or pass --domain)")
    metadata: dict[str, Any] = {}
    nested = record.get("metadata")
    if isinstance(nested, dict):
        metadata.update(nested)
    for key, value in record.items():
        if key in ("question", "answer", "domain", "metadata") or key in _DERIVED:
            continue
        metadata[key] = value
    if "metadata" in record and not isinstance(nested, dict):
        metadata["metadata"] = nested
    return PairInput(domain=domain, question=record["question"], answer=record["answer"], metadata=metadata,
                     where=where)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at \\n only (and a \\r before it). ``str.splitlines`` would also split at
    U+2028, U+2029, U+0085 and other separators that JSON writers leave unescaped inside strings."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl_objects(path: str) -> tuple[str, list[tuple[int, Any]]]:
    """(display name, [(line number, parsed value)]) of a JSONL file (or - for stdin); blank lines skipped, the first
    malformed line is an error naming file and line."""
    name, text = read_source(path)
    rows = []
    for lineno, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{name}:{lineno}: not valid JSON ({exc.msg})") from None
    return name, rows


def parse_jsonl(name: str, text: str, default_domain: str | None) -> list[PairInput]:
    items = []
    for lineno, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            record = json.loads(line)
        except RecursionError:
            raise ValidationError(f"{where}: JSON nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ValidationError(f"{where}: each line must be a JSON object")
        items.append(_from_record(record, default_domain, where))
    return items


def parse_csv(name: str, text: str, default_domain: str | None) -> list[PairInput]:
    dialect = "excel-tab" if name.lower().endswith(".tsv") else "excel"
    reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ValidationError(f"{name}: empty file (a CSV needs a header with question and answer columns)")
    reader.fieldnames = header
    missing = [c for c in ("question", "answer") if c not in header]
    if missing:
        raise ValidationError(
            f"{name}: the CSV header lacks column(s) {', '.join(missing)} (has: {', '.join(header)})"
        )
    items = []
    try:
        for row in reader:
            where = f"{name}:{reader.line_num}"
            if None in row:
                raise ValidationError(f"{where}: more fields than the header has")
            record = {k: v for k, v in row.items() if v is not None}
            if record.get("domain", "") == "":
                record.pop("domain", None)
            items.append(_from_record(record, default_domain, where))
    except csv.Error as exc:
        raise ValidationError(f"{name}:{reader.line_num}: malformed CSV ({exc})") from None
    return items


def read_pairs(path: str, default_domain: str | None, limits: StoreConfig) -> list[PairInput]:
    name, text = read_source(path)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValidationError(f"{name}:{line}: contains a NUL byte")
    parse = parse_jsonl if _detect(name, text) == "jsonl" else parse_csv
    items = parse(name, text, default_domain)
    if not items:
        raise ValidationError(f"{name}: no pairs found")
    for item in items:
        validate(item, limits)
    return items
