"""Lexical search where the pairs live: SQLite FTS5 (BM25) or PostgreSQL full-text search over each pair's question,
answer and ``metadata.variants``.

Dense embeddings miss a query that shares rare words (a name, a code, a number) with a stored pair but little
meaning in the embedder's eyes; BM25 finds exactly those. kvdb.retrieve fuses the two lists. Both backends answer
with a score in [0, 1) that rises with the match: BM25 saturated as ``b / (b + K)`` on SQLite, ``ts_rank_cd``
with its own ``rank / (rank + 1)`` normalisation on PostgreSQL (so the two are not on one scale: thresholds are
calibrated on SQLite).

The SQLite table is written only by triggers on ``pairs`` (migration 0004), so it changes in the same transaction
as the pairs, whatever wrote them.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

FTS_TABLE = "pairs_fts"
PG_INDEX = "ix_pairs_fulltext"
TOKENIZE = "porter unicode61 remove_diacritics 2"  # the pairs' words and the query's alike

# The text of a pair's variants: the JSON array's strings joined by spaces (a string variant counts as one).
_SQLITE_VARIANTS = "(SELECT group_concat(value, ' ') FROM json_each({row}.metadata, '$.variants'))"
_SQLITE_INSERT = (f"INSERT INTO {FTS_TABLE}(rowid, question, answer, variants) "
                  f"VALUES ({{row}}.id, {{row}}.question, {{row}}.answer, {_SQLITE_VARIANTS});")

SQLITE_SCHEMA = [
    f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5(question, answer, variants, tokenize = '{TOKENIZE}')",
    f"CREATE TRIGGER pairs_fts_insert AFTER INSERT ON pairs BEGIN {_SQLITE_INSERT.format(row='new')} END",
    f"CREATE TRIGGER pairs_fts_delete AFTER DELETE ON pairs BEGIN DELETE FROM {FTS_TABLE} WHERE rowid = old.id; END",
    f"CREATE TRIGGER pairs_fts_update AFTER UPDATE ON pairs BEGIN DELETE FROM {FTS_TABLE} WHERE rowid = old.id; "
    f"{_SQLITE_INSERT.format(row='new')} END",
]
SQLITE_FILL = (f"INSERT INTO {FTS_TABLE}(rowid, question, answer, variants) "
               f"SELECT p.id, p.question, p.answer, {_SQLITE_VARIANTS.format(row='p')} FROM pairs p")
SQLITE_DROP = ["DROP TRIGGER IF EXISTS pairs_fts_insert", "DROP TRIGGER IF EXISTS pairs_fts_delete",
               "DROP TRIGGER IF EXISTS pairs_fts_update", f"DROP TABLE IF EXISTS {FTS_TABLE}"]

# Question and variants count double: they are phrased like queries, the answer is longer and looser.
_BM25 = f"bm25({FTS_TABLE}, 2.0, 1.0, 2.0)"
# The BM25 at which the lexical score is one half: about two rare query words found in a question.
BM25_HALF = 8.0

_PG_DOCUMENT = ("to_tsvector('english'::regconfig, question || ' ' || answer || ' ' || "
                "coalesce(metadata ->> 'variants', ''))")
PG_INDEX_SQL = f"CREATE INDEX IF NOT EXISTS {PG_INDEX} ON pairs USING gin ({_PG_DOCUMENT})"



def in_orm_schema(name: str | None, type_: str, parent_names: dict) -> bool:
    """Alembic's ``include_name`` hook: the full-text table (and FTS5's shadow tables) and index are this module's,
    not the ORM's, so comparing the models with the database leaves them out."""
    if type_ == "table" and name is not None and name.startswith(FTS_TABLE):
        return False
    return not (type_ == "index" and name == PG_INDEX)


_WORD = re.compile(r"\w+", re.UNICODE)
# Words that match most questions and say nothing about which pair is meant.
STOPWORDS = frozenset("""
a about an and are as at be been but by can could did do does doing for from had has have how i if in into is it
its me my no not of on or our should so such than that the their them then there these they this those to was we
were what when where which while who whom why will with would you your
""".split())


def terms(query: str) -> list[str]:
    """The query's searchable words: lower case, stop words and one-letter words dropped, each once, in order."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.casefold()):
        if len(word) > 1 and word not in STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)


def fts_query(words: list[str]) -> str:
    """An FTS5 query matching any of ``words`` (each quoted, so no word is read as an operator)."""
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def search(session: Session, query: str, k: int, domain_id: int | None = None) -> list[tuple[int, float]]:
    """Up to ``k`` (pair id, lexical score in [0, 1)) for ``query``, best first; [] when no word of it is stored."""
    words = terms(query)
    if not words:
        return []
    if session.get_bind().dialect.name == "sqlite":
        return _search_sqlite(session, words, k, domain_id)
    return _search_postgres(session, words, k, domain_id)


# A query word found in more pairs than COMMON_PAIRS is left out of a SQLite search that has KEEP_RAREST rarer words:
# BM25 weighs it little (its IDF falls as the pairs holding it grow) while scoring those pairs is most of the search's
# time (100k synthetic pairs: 17 ms a query with every word, 4 ms without those; benchmarks/bench_search.py). Below
# COMMON_PAIRS pairs in all no word is ever left out.
COMMON_PAIRS = 2000
KEEP_RAREST = 2
# Per connection (temp schema): the query's words through the pairs' tokenizer, and the pairs' term counts. Made
# when SQLite opens the connection (kvdb.store.db), outside any transaction, so they last as long as it does (made
# inside a read transaction they would go with its rollback, and making them costs more than the search they save).
SQLITE_CONNECTION_TABLES = [
    f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.kvdb_query_words USING fts5(word, tokenize = '{TOKENIZE}')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.kvdb_query_stems USING fts5vocab(temp, kvdb_query_words, instance)",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.kvdb_pair_terms USING fts5vocab(main, {FTS_TABLE}, row)",
]


def prepare_connection(cursor) -> None:
    """Make the temp tables ``selective`` reads, on a new SQLite connection (a DBAPI cursor, autocommit)."""
    for ddl in SQLITE_CONNECTION_TABLES:
        cursor.execute(ddl)


def selective(session: Session, words: list[str]) -> list[str]:
    """``words`` less those found in more than COMMON_PAIRS pairs, keeping the KEEP_RAREST rarest whatever their
    counts (SQLite; the count is of the word's stem, as the full-text index holds it)."""
    if len(words) <= KEEP_RAREST:
        return words
    # Pair ids only grow, so a store whose largest id is at most COMMON_PAIRS has no word in more pairs than that.
    if (session.execute(text(f"SELECT max(rowid) FROM {FTS_TABLE}")).scalar() or 0) <= COMMON_PAIRS:
        return words
    session.execute(text("DELETE FROM temp.kvdb_query_words"))
    session.execute(text("INSERT INTO temp.kvdb_query_words(rowid, word) VALUES (:i, :w)"),
                    [{"i": i, "w": w} for i, w in enumerate(words)])
    stem = {int(i): t for t, i in session.execute(text("SELECT term, doc FROM temp.kvdb_query_stems"))}
    stems = sorted(set(stem.values()))
    counts = dict(session.execute(
        text(f"SELECT term, doc FROM temp.kvdb_pair_terms WHERE term IN ({', '.join(f':t{i}' for i in range(len(stems)))})"),
        {f"t{i}": t for i, t in enumerate(stems)}).all()) if stems else {}
    pairs = [counts.get(stem.get(i), 0) for i in range(len(words))]
    rarest = set(sorted(range(len(words)), key=lambda i: pairs[i])[:KEEP_RAREST])
    return [w for i, w in enumerate(words) if i in rarest or pairs[i] <= COMMON_PAIRS]


def _search_sqlite(session: Session, words: list[str], k: int, domain_id: int | None) -> list[tuple[int, float]]:
    words = selective(session, words)
    where = " AND pairs.domain_id = :domain" if domain_id is not None else ""
    join = f" JOIN pairs ON pairs.id = {FTS_TABLE}.rowid" if domain_id is not None else ""
    rows = session.execute(
        text(f"SELECT {FTS_TABLE}.rowid, -{_BM25} FROM {FTS_TABLE}{join} WHERE {FTS_TABLE} MATCH :q{where} "
             f"ORDER BY {_BM25} LIMIT :k"),
        {"q": fts_query(words), "k": k, "domain": domain_id},
    ).all()
    return [(int(pid), float(b) / (float(b) + BM25_HALF)) for pid, b in rows if b > 0]


def _search_postgres(session: Session, words: list[str], k: int, domain_id: int | None) -> list[tuple[int, float]]:
    where = " AND domain_id = :domain" if domain_id is not None else ""
    # to_tsquery reads & | ! ( ) : * as operators: the words are \w+ runs, so none can appear in them.
    rows = session.execute(
        text(f"SELECT id, ts_rank_cd({_PG_DOCUMENT}, q, 32) AS s FROM pairs, "
             f"to_tsquery('english'::regconfig, :q) AS q WHERE {_PG_DOCUMENT} @@ q{where} ORDER BY s DESC LIMIT :k"),
        {"q": " | ".join(words), "k": k, "domain": domain_id},
    ).all()
    return [(int(pid), float(s)) for pid, s in rows]
