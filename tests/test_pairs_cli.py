"""The store's CLI: add / list / show / remove / domains / stats, and every bad input refused with nothing changed."""

from __future__ import annotations

import json

import pytest

from kvdb.store.pairs import normalise, pair_hash
from kvdb.store.db import SCHEMA_HEAD
from tests.conftest import Kvdb, write_jsonl

WEIRD = [
    'He said "hi" and left; it\'s fine',
    "Robert'); DROP TABLE pairs;-- ",
    "emoji 😀🚀 and 中文问题：什么是栈？",
    "right-to-left \u202eabc\u202c and \u200f mark",
    "control\tchars\x07 and\r\nnewlines",
    "  leading and trailing spaces  ",
]


def test_add_single_and_list_json_fields(kv: Kvdb):
    out = kv("add", "-d", "cs", "-q", "What is a stack?", "-a", "A LIFO structure.", "-m", "source=test", "-m", "n=3")
    h = out.stdout.splitlines()[0]
    assert h == pair_hash("What is a stack?", "A LIFO structure.")
    rows = kv.json("list")
    assert len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("hash", "domain", "question", "answer", "metadata")} == {
        "hash": h, "domain": "cs", "question": "What is a stack?", "answer": "A LIFO structure.",
        "metadata": {"source": "test", "n": 3},
    }


@pytest.mark.parametrize("text", WEIRD)
def test_text_round_trips_byte_for_byte(kv: Kvdb, text):
    kv("add", "-d", "misc", "-q", text, "-a", text + " (answer)")
    (row,) = kv.json("list")
    assert row["question"] == text
    assert row["answer"] == text + " (answer)"
    shown = kv.json("show", row["hash"][:10])
    assert shown["question"] == text


def test_file_jsonl_keeps_unknown_fields_and_skips_identical(kv: Kvdb, tmp_path):
    rows = [
        {"id": "q1", "domain": "math", "question": "What is a prime?", "answer": "A number with two divisors.",
         "tags": ["number theory"], "source": {"book": "x"}},
        {"id": "q2", "domain": "math", "question": "What is pi?", "answer": "The ratio of circumference to diameter."},
        {"id": "q3", "question": "What is DNA?", "answer": "The molecule of heredity."},
    ]
    path = write_jsonl(tmp_path / "faq.jsonl", rows)
    report = kv.json("add", "--file", str(path), "--domain", "biology")
    assert report["added"] == 3 and report["skipped"] == 0
    listed = {r["metadata"]["id"]: r for r in kv.json("list")}
    assert listed["q1"]["metadata"] == {"id": "q1", "tags": ["number theory"], "source": {"book": "x"}}
    assert listed["q3"]["domain"] == "biology"  # --domain fills lines without one
    again = kv.json("add", "--file", str(path), "--domain", "biology")
    assert again == {"added": 0, "skipped": 3, "replaced": 0, "hashes": again["hashes"]}
    assert kv.count() == 3
    # A listing fed back in adds nothing: derived fields are recognised.
    listing = tmp_path / "listing.jsonl"
    write_jsonl(listing, kv.json("list"))
    assert kv.json("add", "--file", str(listing))["skipped"] == 3


def test_file_csv_and_stdin(kv: Kvdb, tmp_path):
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text('domain,question,answer,source\nphysics,"What is mass?","Amount of matter, roughly.",book\n'
                        'physics,What is a joule?,A unit of energy.,\n', encoding="utf-8")
    assert kv.json("add", "--file", str(csv_path))["added"] == 2
    rows = {r["question"]: r for r in kv.json("list")}
    assert rows["What is mass?"]["answer"] == "Amount of matter, roughly."
    assert rows["What is mass?"]["metadata"] == {"source": "book"}
    line = json.dumps({"domain": "cs", "question": "What is a queue?", "answer": "FIFO."}) + "\n"
    assert kv.json("add", "--file", "-", input=line)["added"] == 1
    assert kv.count() == 3


def test_conflicting_answer_needs_replace(kv: Kvdb):
    kv("add", "-d", "cs", "-q", "What is a heap?", "-a", "A tree with the heap property.")
    res = kv("add", "-d", "cs", "-q", "what is a  HEAP?", "-a", "Something else.", ok=False)
    assert "--replace" in res.stderr and "already has a different answer" in res.stderr
    assert [r["answer"] for r in kv.json("list")] == ["A tree with the heap property."]
    kv("add", "-d", "cs", "-q", "What is a heap?", "-a", "A priority-queue tree.", "--replace")
    assert [r["answer"] for r in kv.json("list")] == ["A priority-queue tree."]
    # The same question in another domain is a different pair.
    kv("add", "-d", "math", "-q", "What is a heap?", "-a", "A tree with the heap property.")
    assert kv.count() == 2


def test_show_prefix_unknown_and_ambiguous(kv: Kvdb, tmp_path):
    rows = [{"domain": "d", "question": f"Question number {i}?", "answer": f"Answer {i}."} for i in range(40)]
    kv("add", "--file", str(write_jsonl(tmp_path / "many.jsonl", rows)))
    hashes = [r["hash"] for r in kv.json("list")]
    first = {}
    for h in hashes:
        first.setdefault(h[0], []).append(h)
    shared = next(c for c, hs in first.items() if len(hs) > 1)
    res = kv("show", shared, ok=False)
    assert "matches several pairs" in res.stderr
    assert kv.json("show", hashes[0][:8])["hash"] == hashes[0]
    missing = next(c for c in "0123456789abcdef" if not any(h.startswith(c + c + c) for h in hashes))
    assert "no pair has a hash" in kv("show", missing * 3, ok=False).stderr
    assert "not a hash prefix" in kv("show", "xyz!", ok=False).stderr


def test_remove_by_hash_and_domain_all_or_nothing(kv: Kvdb, tmp_path):
    rows = [{"domain": dom, "question": f"{dom} q{i}?", "answer": f"a{i}."} for dom in ("a", "b") for i in range(3)]
    kv("add", "--file", str(write_jsonl(tmp_path / "r.jsonl", rows)))
    hashes = [r["hash"] for r in kv.json("list", "--domain", "a")]
    res = kv("remove", hashes[0][:12], "0000000000000", ok=False)
    assert "no pair has a hash" in res.stderr
    assert kv.count() == 6
    assert kv.json("remove", hashes[0][:12], hashes[1])["removed"] == 2
    assert kv.count() == 4
    assert kv.json("remove", "--domain", "b")["removed"] == 3
    assert [d["name"] for d in kv.json("domains")] == ["a"]
    assert "no domain named 'zzz'" in kv("remove", "--domain", "zzz", ok=False).stderr
    assert kv("remove", ok=False).exit_code == 2


def test_domains_and_stats(kv: Kvdb):
    kv("add", "-d", "cs", "-q", "q1?", "-a", "a1.")
    kv("add", "-d", "cs", "-q", "q2?", "-a", "a2.")
    kv("add", "-d", "math", "-q", "q3?", "-a", "a3.")
    assert [(d["name"], d["count"]) for d in kv.json("domains")] == [("cs", 2), ("math", 1)]
    stats = kv.json("stats")
    assert stats["pairs"] == 3 and stats["domains"] == 2 and stats["schema_revision"] == SCHEMA_HEAD
    assert stats["store_revision"] == 3
    assert "pairs:      3 in 2 domain(s)" in kv("stats").stdout
    assert len(kv.json("list", "--domain", "cs")) == 2
    assert "no domain named" in kv("list", "--domain", "nope", ok=False).stderr


# -- bad input: a clear one-line error, a non-zero exit, nothing stored changes ----------------------------------
def _bad_files(tmp_path):
    good = {"domain": "cs", "question": "Fine?", "answer": "Fine."}
    files = {
        "malformed_jsonl": (lambda p: p.write_text(json.dumps(good) + "\n{not json\n"), ":2: not valid JSON"),
        "not_object": (lambda p: p.write_text(json.dumps(good) + "\n[1, 2]\n"), ":2: each line must be a JSON"),
        "missing_answer": (lambda p: write_jsonl(p, [good, {"domain": "cs", "question": "x?"}]), "missing field 'answer'"),
        "empty_question": (lambda p: write_jsonl(p, [good, {**good, "question": "   "}]), ":2: question is empty"),
        "bad_domain": (lambda p: write_jsonl(p, [good, {**good, "question": "B?", "domain": "Bad-Domain"}]),
                       "not a valid name"),
        "nul": (lambda p: p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "question": "a\u0000b"}) + "\n"),
                "NUL"),
        "invalid_utf8": (lambda p: p.write_bytes(json.dumps(good).encode() + b'\n{"question": "\xff\xfe"}\n'),
                         ":2: not valid UTF-8"),
        "deep_metadata": (lambda p: p.write_text(json.dumps(good) + "\n" + '{"question":"D?","answer":"d.","domain":"cs",'
                                                 '"x":' + "[" * 5000 + "]" * 5000 + "}\n"), "nested"),
        "huge_metadata": (lambda p: write_jsonl(p, [good, {**good, "question": "H?", "blob": "x" * 200_000}]),
                          "over the limit"),
        "no_domain": (lambda p: write_jsonl(p, [{"question": "n?", "answer": "n."}]), "no domain"),
        "empty_file": (lambda p: p.write_text("\n\n"), "no pairs found"),
    }
    return files


@pytest.mark.parametrize("case", list(_bad_files(None).keys()))
def test_bad_file_changes_nothing(kv: Kvdb, tmp_path, case):
    kv("add", "-d", "keep", "-q", "Stored before?", "-a", "Yes.")
    make, needle = _bad_files(tmp_path)[case]
    path = tmp_path / f"{case}.jsonl"
    make(path)
    res = kv("add", "--file", str(path), ok=False)
    assert needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.output
    assert kv.count() == 1


def test_csv_without_columns_and_missing_file(kv: Kvdb, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("domain,q,a\ncs,x,y\n")
    res = kv("add", "--file", str(path), ok=False)
    assert "lacks column(s) question, answer" in res.stderr
    res = kv("add", "--file", str(tmp_path / "missing.jsonl"), ok=False)
    assert "does not exist" in res.stderr
    assert kv.count() == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-d", "cs", "-q", "", "-a", "x"], "question is empty"),
        (["-d", "cs", "-q", " \t ", "-a", "x"], "question is empty"),
        (["-d", "cs", "-q", "q?", "-a", "\n"], "answer is empty"),
        (["-d", "CS", "-q", "q?", "-a", "a"], "not a valid name"),
        (["-d", "x" * 65, "-q", "q?", "-a", "a"], "not a valid name"),
        (["-d", "cs", "-q", "q" * 2001, "-a", "a"], "over the limit of 2000"),
        (["-d", "cs", "-q", "q?", "-a", "a", "-m", "novalue"], "is not key=value"),
        (["-d", "cs", "-q", "q?"], "--answer"),
    ],
)
def test_bad_single_add(kv: Kvdb, args, needle):
    res = kv("add", *args, ok=False)
    assert needle in res.stderr
    assert kv.count() == 0


def test_limits_come_from_config(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("store:\n  max_answer_chars: 10\n")
    kv = Kvdb(tmp_path / "h", config=cfg)
    assert "over the limit of 10" in kv("add", "-d", "cs", "-q", "q?", "-a", "a" * 11, ok=False).stderr
    kv("add", "-d", "cs", "-q", "q?", "-a", "a" * 10)


def test_debug_shows_traceback(kv: Kvdb):
    res = kv("--debug", "show", "zz!", ok=False)
    assert res.exception is not None and type(res.exception).__name__ == "ValidationError"


def test_normalise_and_hash_identity():
    assert normalise("  a \n b\u00a0 c ") == "a b c"
    assert pair_hash("What  is x?", "It is y.") == pair_hash("What is x? ", " It is y.")
    assert pair_hash("What is x?", "It is y.") != pair_hash("What is X?", "It is y.")
    # NFC: a composed and a decomposed é are the same text.
    assert pair_hash("caf\u00e9?", "a") == pair_hash("cafe\u0301?", "a")


def test_pair_commands_do_not_import_torch(tmp_path):
    """The pair commands go through kvdb.api, which imports retrieval and the models only where they are used."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import json, sys\nfrom kvdb.cli import cli\n"
              "for args in (['add', '-d', 'cs', '-q', 'What is a heap?', '-a', 'A priority queue.'], ['list'],"
              " ['domains'], ['remove', '--domain', 'cs']):\n"
              "    cli.main(['--home', sys.argv[1], *args, '--json'], prog_name='kvdb', standalone_mode=False)\n"
              "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'faiss') if m in sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "home")], capture_output=True, text=True,
                         env=env, check=True).stdout.splitlines()
    assert '"question": "What is a heap?"' in "\n".join(out) and json.loads(out[-1]) == []
