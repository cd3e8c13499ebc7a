"""The `kvdb` command line: click commands that parse options, call the library and print text or JSON.

Library errors (``KvdbError``) become one-line click errors in one place, ``KvdbGroup.invoke``; nothing else here
catches exceptions. ``--debug`` (or ``KVDB_DEBUG=1``) lets the traceback through.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import click

from kvdb import __version__
from kvdb.errors import KvdbError, ValidationError
from kvdb.runtime import Runtime


class KvdbClickError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool(root.params.get("debug")) or os.environ.get("KVDB_DEBUG") == "1"


class KvdbGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KvdbError as exc:
            if _debug(ctx):
                raise
            raise KvdbClickError(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as exc:  # an unexpected failure still ends in one sentence unless --debug
            if _debug(ctx):
                raise
            raise KvdbClickError(
                f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
            ) from None


def emit_json(value: Any, indent: int | None = 2) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=indent))


def _rt(ctx: click.Context) -> Runtime:
    return ctx.find_root().obj


def _kb(ctx: click.Context, **options):
    """The library over this invocation's home and config (its notices are logged: stderr unless -q)."""
    from kvdb.api import KnowledgeBase

    kb = KnowledgeBase(_rt(ctx), **options)
    ctx.call_on_close(kb.close)  # pending writes (prefix-state files) finish before the command returns
    return kb


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group(cls=KvdbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="KVDB_HOME", type=click.Path(file_okay=False), default=None,
              help="Runtime root holding the store, index, caches and checkpoints [env KVDB_HOME; default ./var].")
@click.option("--config", "config_path", envvar="KVDB_CONFIG", type=click.Path(dir_okay=False), default=None,
              help="YAML config [env KVDB_CONFIG; default configs/default.yaml].")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--verbose", "-v", count=True, help="Also log progress on stderr (-vv: debugging detail).")
@click.option("--quiet", "-q", is_flag=True, help="Log errors only: no notices on stderr.")
@click.version_option(__version__, prog_name="kvdb")
@click.pass_context
def cli(ctx: click.Context, home: str | None, config_path: str | None, debug: bool, verbose: int, quiet: bool) -> None:
    """kvdb: an embedded knowledge database that makes an LLM answer knowledge questions faster, with the same
    output."""
    from kvdb import logs

    logs.configure(verbose, quiet)
    ctx.obj = Runtime.open(home, config_path)


# -- store ----------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--examples", is_flag=True, help="Also load the default knowledge set (70 pairs, 7 domains).")
@json_option
@click.pass_context
def init(ctx: click.Context, examples: bool, as_json: bool) -> None:
    """Create (or check) the home and its store; optionally load the default knowledge set."""
    rt = _rt(ctx)
    store = rt.store
    result: dict[str, Any] = {"home": str(rt.home.root), "database": store.where, "revision": store.head_revision()}
    if examples:
        from kvdb.examples import load_examples

        result["examples"] = load_examples(store, rt.config.store).as_dict()
    if as_json:
        emit_json(result)
        return
    click.echo(f"kvdb home {result['home']} ready (schema {result['revision']})")
    if examples:
        ex = result["examples"]
        click.echo(f"default knowledge set: added {ex['added']}, skipped {ex['skipped']} already stored")


def _parse_meta(values: tuple[str, ...]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"--meta {item!r} is not key=value")
        try:
            meta[key.strip()] = json.loads(raw)  # numbers, booleans, lists and objects keep their type
        except json.JSONDecodeError:
            meta[key.strip()] = raw
        except RecursionError:
            raise ValidationError(f"--meta {key.strip()!r}: the JSON value is nested too deeply") from None
    return meta


@cli.command()
@click.option("--domain", "-d", help="Domain of the pair (for --file: the default for lines without one).")
@click.option("--question", "-q", help="The question.")
@click.option("--answer", "-a", help="The answer.")
@click.option("--meta", "-m", multiple=True, metavar="KEY=VALUE", help="Metadata; repeatable; VALUE may be JSON.")
@click.option("--file", "-f", "path", metavar="FILE", help="JSONL or CSV file of pairs, or - for stdin.")
@click.option("--replace", is_flag=True, help="Allow a new answer to replace a stored question's answer.")
@json_option
@click.pass_context
def add(ctx, domain, question, answer, meta, path, replace, as_json) -> None:
    """Add one pair (-d -q -a) or a JSONL/CSV file of pairs (--file), all or nothing."""
    from kvdb.store.ingest import read_pairs
    from kvdb.store.pairs import PairInput

    kb = _kb(ctx)
    limits = kb.config.store
    if path is not None:
        if question is not None or answer is not None or meta:
            raise click.UsageError("give either --file or -q/-a/--meta, not both")
        items = read_pairs(path, domain, limits)
    else:
        if question is None or answer is None or domain is None:
            raise click.UsageError("give --domain, --question and --answer (or --file)")
        items = [PairInput(domain=domain, question=question, answer=answer, metadata=_parse_meta(meta))]
    report = kb.add_pairs(items, replace=replace)
    if as_json:
        emit_json({**report.as_dict(), "hashes": report.hashes})
        return
    if path is None:
        click.echo(report.hashes[0])
    click.echo(f"added {report.added}, skipped {report.skipped} already stored, replaced {report.replaced}")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Text for a terminal: control characters (ESC sequences could rewrite the screen) shown escaped, e.g. \\x1b.
    --json prints the exact text."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _one_line(text: str, width: int) -> str:
    text = _printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command(name="list")
@click.option("--domain", "-d", help="Only this domain.")
@json_option
@click.pass_context
def list_(ctx, domain, as_json) -> None:
    """List pairs (all of them; --json prints a JSON array)."""
    rows = _kb(ctx).list(domain)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(f"{row['hash'][:12]}  {row['domain']:<10} {_one_line(row['question'], 90)}")
    click.echo(f"{len(rows)} pair(s)", err=True)


@cli.command()
@click.argument("hash_prefix")
@json_option
@click.pass_context
def show(ctx, hash_prefix, as_json) -> None:
    """Show one pair by its hash (a unique prefix is enough)."""
    row = _kb(ctx).get(hash_prefix)
    if as_json:
        emit_json(row)
        return
    click.echo(f"hash:     {row['hash']}\ndomain:   {row['domain']}\nquestion: {_printable(row['question'])}\n"
               f"answer:   {_printable(row['answer'])}")
    if row["metadata"]:
        click.echo(f"metadata: {json.dumps(row['metadata'], ensure_ascii=False)}")
    click.echo(f"added:    {row['created_at']}")


@cli.command()
@click.argument("hash_prefixes", nargs=-1)
@click.option("--domain", "-d", help="Remove every pair of this domain, and the domain.")
@json_option
@click.pass_context
def remove(ctx, hash_prefixes, domain, as_json) -> None:
    """Remove pairs by hash (prefixes) or a whole domain; all named pairs must exist or none is removed."""
    if bool(hash_prefixes) == bool(domain):
        raise click.UsageError("give one or more hashes, or --domain, but not both")
    removed = _kb(ctx).remove(*hash_prefixes, domain=domain)
    if as_json:
        emit_json({"removed": len(removed), "hashes": removed})
    else:
        click.echo(f"removed {len(removed)} pair(s)")


@cli.command()
@json_option
@click.pass_context
def domains(ctx, as_json) -> None:
    """List domains with their pair counts."""
    rows = _kb(ctx).domains()
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(f"{row['name']:<16} {row['count']:>6}  {row['description']}")


@cli.command()
@json_option
@click.pass_context
def stats(ctx, as_json) -> None:
    """Counts of pairs, domains, built vectors and embeddings, and the store's size."""
    from kvdb.store.stats import store_stats

    rt = _rt(ctx)
    result = store_stats(rt.store, rt.home)
    if as_json:
        emit_json(result)
        return
    click.echo(f"home:       {result['home']}")
    click.echo(f"pairs:      {result['pairs']} in {result['domains']} domain(s)")
    for model in result["models"]:
        click.echo(f"vectors:    {model['pairs_built']} pair(s) built by {model['name']} "
                   f"({model['fingerprint'][:12]}, {model['tokens']} tokens)")
    for emb in result["embeddings"]:
        click.echo(f"embeddings: {emb['count']} by {emb['embedder']}")
    click.echo(f"database:   {result['database_bytes']} bytes ({result['backend']}), schema "
               f"{result['schema_revision']}")


# -- build, retrieval, export -----------------------------------------------------------------------------------
def _show_progress(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


def _domain_arg(domain: str | None) -> str | None:
    return None if domain in (None, "all") else domain


@cli.command()
@click.option("--domain", "-d", default="all", show_default=True, help="Build only this domain ('all' for every one).")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=None, help="Pairs per forward pass [config].")
@click.option("--rebuild", is_flag=True, help="Recompute vectors and embeddings even where they exist.")
@click.option("--states", is_flag=True,
              help="Then answer every stored question once on the answering engine: recorded for exact replay where "
                   "the engine allows it, prefix states saved (what `kvdb train` does after training).")
@json_option
@click.pass_context
def build(ctx, domain, batch_size, rebuild, states, as_json) -> None:
    """Prefill pairs that lack vectors for the current model; embed them for retrieval; refresh the index."""
    rt = _rt(ctx)
    result = _build(rt, _domain_arg(domain), batch_size, rebuild, as_json)
    if result is None:
        return  # a torchrun rank other than 0: rank 0 reports
    if states:
        from kvdb.warm import warm_answers

        result["warmed"] = warm_answers(rt, domain=_domain_arg(domain), progress=_show_progress(as_json))
    _print_build(result, as_json)


def _build(rt: Runtime, domain: str | None, batch_size: int | None, rebuild: bool,
           as_json: bool) -> dict[str, Any] | None:
    """Build (on every torchrun rank); the report, on rank 0 alone."""
    if not rebuild and os.environ.get("WORLD_SIZE", "1") == "1":
        from kvdb.uptodate import nothing_to_build

        result = nothing_to_build(rt, domain)  # store queries only: torch is not even imported
        if result is not None:
            return result
    from kvdb import distributed
    from kvdb.build import Builder
    from kvdb.retrieve import Retriever

    with distributed.session() as me:
        _rank_device(rt, me)
        with distributed.main_first():  # under torchrun: rank 0 converts and hashes the models, the others reuse
            builder = Builder(rt.config, rt.home, rt.store)
            _materialise(rt, me)
        report = builder.run(domain=domain, batch_size=batch_size, rebuild=rebuild,
                             progress=_show_progress(as_json), shard=(me.rank, me.world))
        if not me.is_main:
            return None  # rank 0 alone rebuilds the index and reports, for every rank (the report is their sum)
        retriever = Retriever(rt.config, rt.home, rt.store, embedder=builder._embedder,
                              model_fingerprint=builder.model_ref.fingerprint)
        index = retriever.index()
    return {**report.as_dict(), "indexed_pairs": index.meta.get("pairs", 0)}


def _print_build(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    for failure in result["failures"][:10]:
        click.echo(f"failed {failure['hash'][:12]}: {failure['reason']}", err=True)
    rate = f", {result['tokens_per_second']:.0f} tokens/s" if result["tokens"] else ""
    ranks = f" on {len(result['ranks'])} ranks" if result.get("ranks") else ""
    click.echo(f"built {result['built']}, skipped {result['skipped']} already built, failed {result['failed']}"
               f" ({result['tokens']} tokens in {result['seconds']:.1f}s{rate}{ranks}); index covers "
               f"{result['indexed_pairs']} pairs")
    if result.get("warmed"):
        click.echo(_warmed_line(result["warmed"]))


def _warmed_line(warmed: dict[str, Any]) -> str:
    """One line on kvdb.warm's report (build --states, train)."""
    if "skipped" in warmed:
        return f"stored questions: {warmed['skipped']}"
    return (f"stored questions on {warmed['engine']}: answered {warmed['answered']}, already recorded "
            f"{warmed['replayed']}, failed {warmed['failed']} ({warmed['seconds']:.1f}s)")


def _materialise(rt: Runtime, me) -> None:
    """Under torchrun, the model converted and the model and embedder hashed (into the home's caches) once, by the
    rank that runs first; alone, nothing (the library does it when it needs the model)."""
    from kvdb.identity import resolve_embedder
    from kvdb.lm import materialise

    if me.distributed:
        ref = materialise(rt.config.model, rt.home)
        resolve_embedder(rt.config.embedder, rt.home, ref.fingerprint)


def _rank_device(rt: Runtime, me) -> None:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK) when the config leaves the device to kvdb."""
    import dataclasses

    from kvdb.distributed import device_for

    if me.distributed:
        model = dataclasses.replace(rt.config.model, device=device_for(me, rt.config.model.device))
        rt.config = dataclasses.replace(rt.config, model=model)


def _read_queries(path: str) -> list[str]:
    from kvdb.store.ingest import read_jsonl_objects

    name, rows = read_jsonl_objects(path)
    queries = []
    for lineno, obj in rows:
        query = obj.get("query") if isinstance(obj, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise ValidationError(f"{name}:{lineno}: needs a non-empty 'query' field")
        queries.append(query)
    return queries


@cli.command()
@click.argument("question", required=False)
@click.option("--file", "-f", "path", metavar="FILE", help="JSONL of {\"query\": ...} objects (or -); one result a line.")
@click.option("--top-k", "-k", type=click.IntRange(1, 1000), default=None, help="Pairs to return [config index.top_k].")
@click.option("--domain", "-d", default=None, help="Search only this domain.")
@click.option("--min-score", type=float, default=None,
              help="Calibrated probability (0-1) the best match must reach to be called confident [config "
                   "index.min_confidence]; the best score instead where index.confident_threshold_no_rerank is set "
                   "or with the re-rank.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False), default=None,
              help="Retrieve from an exported knowledge_cache.pth instead of the store (the store is not opened).")
@click.option("--generate", "-g", is_flag=True, help="Answer with the base model (speculative, lossless).")
@click.option("--max-new-tokens", "-n", type=int, default=None, help="With --generate: answer length cap [config].")
@click.option("--draft", "draft_path", type=click.Path(dir_okay=False), default=None,
              help="With --generate: draft checkpoint [best one in KVDB_HOME/checkpoints].")
@click.option("--no-draft", is_flag=True, help="With --generate: do not use a learned draft (copying only).")
@click.option("--draft-only", is_flag=True,
              help="With --generate: the learned draft answers alone, UNVERIFIED (fast, approximate).")
@click.option("--vs-greedy", is_flag=True,
              help="With --generate: also decode plainly (greedy generate) and report the speedup and identity.")
@json_option
@click.pass_context
def query(ctx, question, path, top_k, domain, min_score, cache_path, generate, max_new_tokens, draft_path, no_draft,
          draft_only, vs_greedy, as_json) -> None:
    """Find the pairs that best answer QUESTION (or each query of --file); --generate answers it."""
    if (question is None) == (path is None):
        raise click.UsageError("give a QUESTION or --file, not both")
    if generate and min_score is not None:
        raise click.UsageError("--min-score goes without --generate")
    if not generate and (max_new_tokens is not None or draft_path or no_draft or draft_only or vs_greedy):
        raise click.UsageError("--max-new-tokens, --draft, --no-draft, --draft-only and --vs-greedy go with "
                               "--generate")
    if draft_only and no_draft:
        raise click.UsageError("--draft-only and --no-draft contradict each other")
    queries = [question] if path is None else _read_queries(path)
    if generate:
        _generate(ctx, queries, path is not None, top_k, _domain_arg(domain), max_new_tokens, draft_path, no_draft,
                  draft_only, cache_path, vs_greedy, as_json)
        return
    kb = _kb(ctx, cache=cache_path)
    with _query_progress(len(queries) if path else 0) as bar:
        for start in range(0, len(queries), QUERY_BATCH):
            for result in kb.query_many(queries[start : start + QUERY_BATCH], top_k, _domain_arg(domain), min_score):
                with bar.external_write_mode():
                    _print_result(result, many=path is not None, as_json=as_json)
                bar.update()


# Questions of `kvdb query --file` embedded and searched together: large enough to batch the embedder, small enough
# that the first lines come out at once.
QUERY_BATCH = 32


def _query_progress(total: int):
    """A progress bar on stderr while a --file of questions is searched, only where stderr is a terminal (the results
    on stdout are the same either way)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="query", desc="query", disable=total == 0 or not sys.stderr.isatty(), leave=False,
                dynamic_ncols=True)


def _print_result(result, many: bool, as_json: bool) -> None:
    """One result, flushed at once so that a reader of a --file's output gets each line as soon as it is known."""
    if as_json:
        emit_json(result.to_dict(), indent=None if many else 2)
    else:
        if many:
            click.echo(f"? {result.query}")
        _print_matches(result)
    sys.stdout.flush()


def _print_matches(result, answer_lines: bool = True) -> None:
    flag = "" if result.confident else "  (no confident match)"
    for rank, m in enumerate(result.matches, 1):
        click.echo(f"{rank}. [{m.score:.3f}] {m.hash[:12]} {m.domain}: {_one_line(m.question, 80)}"
                   f"{flag if rank == 1 else ''}")
        if rank == 1 and answer_lines:
            click.echo(f"   {_one_line(m.answer, 200)}")


def _generate(ctx, queries, many, top_k, domain, max_new_tokens, draft_path, no_draft, draft_only, cache_path,
              vs_greedy, as_json) -> None:
    kb = _kb(ctx, draft=draft_path, use_draft=not no_draft, cache=cache_path)
    answerer = kb.answerer()
    kb.flush_notices()
    if not draft_only:
        answerer.pass_plan()  # measured once per machine, before anything is timed
    if vs_greedy:
        answerer.warm_up()  # the first passes of a process are slow for any method: keep them out of the ratio
    kb.flush_notices()
    for q in queries:
        if as_json:
            result = kb.answer(q, max_new_tokens, top_k, domain, draft_only=draft_only).raw
            if vs_greedy:
                _vs_greedy(kb.rt, answerer, result)
            kb.flush_notices()
            emit_json(result.as_dict(), indent=None if many else 2)
            continue
        if many:
            click.echo(f"? {q}")
        if draft_only:
            click.echo("[draft only, NOT verified by the base model]", err=True)
        result = kb.answer(q, max_new_tokens, top_k, domain, draft_only=draft_only,
                           on_text=lambda piece: click.echo(piece, nl=False)).raw
        click.echo()
        s = result.stats
        how = ("drafted alone, unverified" if draft_only else
               f"replayed: {s['engine']}'s own answer to this very prompt, no model pass" if s.get("replayed") else
               f"{s['verify_steps']} verify steps, {s['accepted']}/{s['drafted']} drafted tokens accepted")
        click.echo(f"[{s['new_tokens']} tokens in {s['seconds']:.2f}s, {how}; reference: "
                   f"{result.result.matches[0].question if result.result.matches else 'none'}]", err=True)
        if vs_greedy:
            b = _vs_greedy(kb.rt, answerer, result)
            if draft_only:
                sim = b["similarity"]
                click.echo(f"[verified answer in {b['seconds']:.2f}s (the draft alone was {b['speedup']:.2f}x faster);"
                           f" similarity to it: cosine {sim['cosine']:.3f}, token F1 {sim['token_f1']:.3f}]", err=True)
            else:
                click.echo(f"[plain greedy: {b['seconds']:.2f}s; speedup {b['speedup']:.2f}x; identical output: "
                           f"{'yes' if b['identical'] else 'NO'}]", err=True)
        kb.flush_notices()


def _vs_greedy(rt, answerer, result) -> dict[str, Any]:
    """--vs-greedy: plain greedy on the same prompt; for a draft-only answer also `kvdb compare` of the two texts."""
    baseline = result.compare_with_greedy(answerer.lm, answerer.engine)
    if not result.verified:
        from kvdb.similarity import compare_texts

        draft_text, verified_text = result.answer.strip() or "-", baseline["answer"].strip() or "-"
        baseline["similarity"] = compare_texts(rt.config, rt.home, draft_text, verified_text)
    return baseline


@cli.command()
@click.argument("path", metavar="FILE")
@click.option("--target", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True,
              help="The most unanswerable questions that may be called confident, as a share.")
@click.option("--domain", "-d", default=None, help="Search only this domain.")
@json_option
@click.pass_context
def calibrate(ctx, path, target, domain, as_json) -> None:
    """Choose index.min_confidence for this store from labelled questions (changes nothing).

    FILE (or -) is JSONL: {"query": ..., "question": <the stored question it should find>} (or "hash": a pair hash
    or its first 8+ characters) for a question the store answers, {"query": ..., "answerable": false} for one it
    does not. Prints the lowest point that calls at most --target of the unanswerable ones confident, how many
    answerable ones it keeps, and the same at the point in force."""
    from kvdb.calibrate import parse
    from kvdb.store.ingest import read_jsonl_objects

    name, rows = read_jsonl_objects(path)
    labelled = parse((f"{name}:{lineno}", obj) for lineno, obj in rows)
    report = _kb(ctx).calibrate(labelled, target, _domain_arg(domain))
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"{report.answerable} answerable questions (their pair first for {report.recall_at_1:.1%}), "
               f"{report.unanswerable} unanswerable")
    for label, point in (("now", report.current), ("chosen", report.chosen)):
        click.echo(f"{label:>6}: min_confidence {point.min_confidence:.4f}: {point.answerable_confident:.1%} of the "
                   f"answerable confident (pair first), {point.unanswerable_confident:.1%} of the unanswerable")
    click.echo(f"set index.min_confidence: {report.chosen.min_confidence:.4f} in the config, or pass "
               f"--min-score {report.chosen.min_confidence:.4f} to kvdb query")


@cli.command()
@click.option("--domain", "-d", default="all", show_default=True,
              help="'all': the merged cache and one per domain; or just this domain's.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder to write into [KVDB_HOME/knowledge_cache].")
@json_option
@click.pass_context
def export(ctx, domain, out, as_json) -> None:
    """Write knowledge_cache.pth and knowledge_cache_<domain>.pth (built pairs, their vectors and embeddings)."""
    files = _kb(ctx).export(out=out, domain=domain)
    if as_json:
        emit_json(files)
        return
    for f in files:
        click.echo(f"{f['path']}  ({f['pairs']} pairs)")


@cli.command(name="import")
@click.argument("path", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def import_(ctx, path, as_json) -> None:
    """Add the pairs of an exported cache; its vectors are reused when made by the current model."""
    from kvdb.export import import_cache

    rt = _rt(ctx)
    report = import_cache(rt.config, rt.home, rt.store, path)
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(f"added {report.added}, skipped {report.skipped} already stored; reused vectors of {report.vectors}"
               f" and embeddings of {report.embeddings} pair(s), recorded answers of {report.base_answers}")
    if report.vectors_skipped_reason:
        click.echo(f"vectors not reused: {report.vectors_skipped_reason}", err=True)


@cli.command()
@click.argument("text_a")
@click.argument("text_b")
@json_option
@click.pass_context
def compare(ctx, text_a, text_b, as_json) -> None:
    """Similarity of two texts: embedding cosine and token overlap (e.g. a generated answer vs a reference)."""
    from kvdb.similarity import compare_texts

    rt = _rt(ctx)
    result = compare_texts(rt.config, rt.home, text_a, text_b)
    if as_json:
        emit_json(result)
        return
    click.echo(f"cosine {result['cosine']:.4f}  token F1 {result['token_f1']:.4f}  "
               f"exact {'yes' if result['exact'] else 'no'}  ({result['embedder']})")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; a non-loopback one needs --api-key (or --insecure).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="KVDB_API_KEY", default=None,
              help="Require Authorization: Bearer KEY on every endpoint but /health [env KVDB_API_KEY].")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.pass_context
def serve(ctx, host, port, api_key, insecure) -> None:
    """Serve over HTTP: OpenAI-compatible chat completions (streaming), /v1/query, /v1/pairs, /v1/build, /metrics."""
    from kvdb.api import KnowledgeBase
    from kvdb.serve import check_bind, run

    check_bind(host, api_key, insecure)  # refused before any model is loaded
    click.echo(f"kvdb serving {_rt(ctx).home.root} on http://{host}:{port} (loading models first)", err=True)
    run(KnowledgeBase(_rt(ctx)), host, port, api_key, insecure)


@cli.command()
@click.option("--questions", "questions_path", metavar="FILE", default=None,
              help="JSONL of {\"query\", \"workload\": stored|paraphrased|unanswerable} [the store's questions, "
                   "bundled paraphrases and off-topic questions].")
@click.option("--per-workload", type=click.IntRange(1, 10_000), default=6, show_default=True,
              help="Questions per workload when --questions is not given.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(1, 4096), default=None, help="Answer length cap [config].")
@click.option("--methods", default=",".join(("greedy", "hf_prompt_lookup", "hf_early_exit", "kvdb_copy", "kvdb_draft",
                                            "llamacpp_greedy", "llamacpp_prompt_lookup", "kvdb_llamacpp",
                                            "kvdb_llamacpp_nostates")),
              show_default=True, help="Comma-separated methods to run (each engine's greedy baseline always runs; "
                                      "llama.cpp methods are skipped where llama.cpp cannot run the model).")
@click.option("--repeat", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Runs per method and question, round-robin; the fastest counts.")
@click.option("--draft", "draft_path", type=click.Path(dir_okay=False), default=None,
              help="Draft checkpoint for kvdb_draft [best one in KVDB_HOME/checkpoints].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a bar chart PNG here.")
@json_option
@click.pass_context
def bench(ctx, questions_path, per_workload, max_new_tokens, methods, repeat, draft_path, plot_path, as_json) -> None:
    """Speed of greedy, Hugging Face and kvdb decoding on the same prompts, for stored, paraphrased and
    unanswerable questions (ratios against greedy in the same run)."""
    from kvdb.bench import default_questions, markdown_table, plot, read_questions, run_bench

    rt = _rt(ctx)
    questions = read_questions(questions_path) if questions_path else default_questions(rt, per_workload)
    report = run_bench(rt, questions, max_new_tokens, [m.strip() for m in methods.split(",") if m.strip()],
                       repeat=repeat, draft_path=draft_path, progress=_show_progress(as_json))
    if plot_path:
        report["plot"] = str(plot(report, plot_path))
    for notice in report["notices"]:
        click.echo(f"notice: {notice}", err=True)
    if as_json:
        emit_json(report)
        return
    click.echo(f"{report['model']} on {report['device']} {report['dtype']}, max_new_tokens={report['max_new_tokens']}, "
               f"{len(questions)} questions, draft: {report['draft'] or 'none'}\n")
    click.echo(markdown_table(report))
    if plot_path:
        click.echo(f"\nchart: {report['plot']}")


# -- training ---------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None, help="Epochs [config training.num_epochs].")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Batch size [config].")
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True), default=None, help="Learning rate [config].")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the output folder.")
@click.option("--cache", type=click.Path(dir_okay=False), default=None,
              help="Train from an exported knowledge_cache.pth instead of the store.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Checkpoint folder [KVDB_HOME/checkpoints].")
@click.option("--eval-only", is_flag=True, help="Only measure the draft (best checkpoint, or untrained) on held-out data.")
@click.option("--variants/--no-variants", default=None,
              help="Also train on the question variants in pair metadata [config training.use_variants]; "
                   "--no-variants prepares about a third of the data (quick runs).")
@json_option
@click.pass_context
def train(ctx, epochs, batch_size, lr, resume, cache, out, eval_only, variants, as_json) -> None:
    """Train the knowledge-aware draft model on the base model's own answers; save best and periodic checkpoints."""
    import dataclasses

    from kvdb.train import train as run_training

    rt = _rt(ctx)
    if variants is not None:
        rt.config = dataclasses.replace(rt.config, training=dataclasses.replace(rt.config.training,
                                                                                use_variants=variants))
    from kvdb import distributed

    with distributed.session() as me:
        _rank_device(rt, me)
        with distributed.main_first():
            _materialise(rt, me)
        result = run_training(rt, epochs=epochs, batch_size=batch_size, lr=lr, resume=resume, cache=cache, out=out,
                              eval_only=eval_only, progress=_show_progress(as_json))
    if not me.is_main:
        return  # rank 0 reports for all (every rank computed the same metrics)
    if as_json:
        emit_json(result)
        return
    click.echo(_train_summary(result))


def _train_summary(r: dict[str, Any]) -> str:
    """A few lines for a person; --json has everything."""
    m, base, data = r.get("metrics") or {}, r.get("untrained_early_exit") or {}, r.get("data") or {}
    lines = [f"data: {data.get('pairs', '?')} pairs, {data.get('train_examples', '?')} training and "
             f"{data.get('heldout_examples', '?')} held-out questions; base answers recorded {data.get('recorded', 0)}, "
             f"reused {data.get('reused', 0)}"]
    if "epochs_run" in r:
        ranks = f" on {r['ranks']} ranks" if r.get("ranks") else ""
        lines.append(f"trained {r['epochs_run']} epoch(s) to epoch {r['epoch']}{ranks} in {r['seconds']:.0f}s "
                     f"(data {r.get('seconds_data', 0):.0f}s); train loss {r.get('train_loss')}")
    else:
        lines.append(f"evaluated {r.get('checkpoint') or 'the untrained draft'} (epoch {r.get('epoch', 0)})")
    lines.append(f"{r.get('eval_set', 'heldout')}: top-1 agreement with the base model {m.get('top1_agreement', 0):.3f} "
                 f"(untrained early exit {base.get('top1_agreement', 0):.3f})")
    best = (r.get("best") or {}).get("path")
    if best:
        lines.append(f"best checkpoint: {best}")
    if r.get("warmed"):
        lines.append(_warmed_line(r["warmed"]))
    for key, label in (("log", "log"), ("plot", "plot")):
        if r.get(key):
            lines.append(f"{label}: {r[key]}")
    return "\n".join(lines)


# -- doctor ---------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--repair", is_flag=True, help="Fix what can be rebuilt: bad blobs, orphan rows, the index, temp files.")
@json_option
@click.pass_context
def doctor(ctx, repair, as_json) -> None:
    """Check the schema, integrity, blobs, index and files of the home; --repair fixes what can be rebuilt."""
    from kvdb.doctor import check, raise_if_problems

    report = check(_rt(ctx), repair=repair)
    if as_json:
        emit_json(report.as_dict())
    else:
        for f in report.findings:
            click.echo(f"{f.status:<9} {f.check:<13} {f.detail}")
    raise_if_problems(report)


# -- schema ---------------------------------------------------------------------------------------------------
@cli.group(cls=KvdbGroup)
def db() -> None:
    """Schema migrations of the store (Alembic, run from code) and copying it to another database."""


@db.command()
@click.argument("revision", default="head")
@click.pass_context
def upgrade(ctx, revision) -> None:
    """Migrate the store to REVISION (default: the newest)."""
    store = _rt(ctx).unmigrated_store()
    before = store.current_revision()
    store.upgrade(revision)
    click.echo(f"schema {before or 'empty'} -> {store.current_revision()}")


@db.command()
@click.argument("revision")
@click.pass_context
def downgrade(ctx, revision) -> None:
    """Migrate the store back to REVISION ('base' empties it); data in dropped tables is lost."""
    store = _rt(ctx).unmigrated_store()
    before = store.current_revision()
    store.downgrade(revision)
    click.echo(f"schema {before or 'empty'} -> {store.current_revision() or 'empty'}")


@db.command()
@json_option
@click.pass_context
def status(ctx, as_json) -> None:
    """Show the store's schema revision and whether it is current."""
    store = _rt(ctx).unmigrated_store()
    current, head = store.current_revision(), store.head_revision()
    result = {"database": store.where, "current": current, "head": head, "up_to_date": current == head}
    if as_json:
        emit_json(result)
        return
    state = "up to date" if current == head else "needs `kvdb db upgrade`"
    click.echo(f"{store.where}: schema {current or 'empty'} (newest {head}), {state}")


@db.command(name="copy")
@click.option("--to", "target", required=True, metavar="URL",
              help="Database URL of the new, empty store: sqlite:////path/kvdb.sqlite or "
                   "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB.")
@json_option
@click.pass_context
def copy_(ctx, target, as_json) -> None:
    """Copy the whole store (every table, ids kept) into a new, empty database, in one transaction."""
    from kvdb.store.copy import copy_store

    rt = _rt(ctx)
    report = copy_store(rt.store, target, busy_timeout_ms=rt.config.store.busy_timeout_ms)
    if as_json:
        emit_json(report.as_dict())
        return
    for table, n in report.tables.items():
        click.echo(f"{table:<14} {n:>8} row(s)")
    click.echo(f"copied {sum(report.tables.values())} row(s) from {report.source} to {report.target}")


def main() -> None:
    cli(prog_name="kvdb")


if __name__ == "__main__":
    main()
