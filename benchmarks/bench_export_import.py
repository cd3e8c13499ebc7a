"""Peak memory of `kvdb export` and `kvdb import` on a large store of synthetic vectors.

A tiny random model stands in for the base model (only its fingerprint and hidden size matter: the vectors are
synthetic fp16, written straight into the store as `kvdb build` would). With the defaults the vectors total more
than 2 GiB, so a writer or reader that held the store in memory would show it. Each command runs in its own process;
its peak resident set size (ru_maxrss) is reported. The re-export of the imported home must give the same bytes as
the first export: nothing is lost on the way.

    .venv/bin/python benchmarks/bench_export_import.py                      # 100k pairs, ~2.5 GiB of vectors
    .venv/bin/python benchmarks/bench_export_import.py --pairs 10000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvdb.identity import sha256_file  # noqa: E402

GIB = 1024 ** 3


def child(argv: list[str], rss_file: str) -> None:
    """Run one kvdb command in this process, then record this process's peak RSS."""
    from kvdb.cli import cli

    try:
        cli.main(args=argv, prog_name="kvdb", standalone_mode=False)
    finally:
        Path(rss_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def run_measured(argv: list[str], work: Path) -> tuple[float, int]:
    rss_file = work / "rss.txt"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", str(rss_file), "--", *argv], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, int(rss_file.read_text())


def populate(home: Path, config: Path, pairs: int, tokens: int, layers: list[int], domains: int, seed: int) -> int:
    """Add ``pairs`` pairs and synthetic vectors and embeddings for them; returns the bytes of vectors stored."""
    import torch
    from sqlalchemy import insert, select

    from kvdb.identity import resolve_embedder
    from kvdb.identity import resolve_model
    from kvdb.runtime import Runtime
    from kvdb.store.blobs import pack
    from kvdb.store.models import Embedding, ModelInfo, Pair, PairVectors
    from kvdb.store.pairs import PairInput, add_pairs

    rt = Runtime.open(home, config)
    ref = resolve_model(rt.config.model, rt.home)
    emb = resolve_embedder(rt.config.embedder, rt.home, ref.fingerprint)
    hidden = json.loads((Path(ref.load_path) / "config.json").read_text())["hidden_size"]
    items = [PairInput(domain=f"d{i % domains}", question=f"Synthetic question number {i} about topic {i % 97}?",
                       answer=f"Synthetic answer {i}: " + "some words of the stored answer " * 3)
             for i in range(pairs)]
    add_pairs(rt.store, items, rt.config.store)
    gen = torch.Generator().manual_seed(seed)
    stored = 0
    with rt.store.write() as session:
        session.add(ModelInfo(fingerprint=ref.fingerprint, name=ref.name, source=rt.config.model.source,
                              hidden_size=hidden, num_layers=max(layers), info={"synthetic": True}))
        session.flush()
        hashes = list(session.scalars(select(Pair.hash).order_by(Pair.id)))
        for lo in range(0, len(hashes), 1000):
            chunk = hashes[lo:lo + 1000]
            block = torch.randn(len(chunk), len(layers), tokens, hidden, generator=gen).to(torch.float16)
            vec_rows, emb_rows = [], []
            for j, h in enumerate(chunk):
                tensors = {"token_ids": torch.randint(0, 500, (tokens,), generator=gen, dtype=torch.int32)}
                tensors.update({f"layer_{layer}": block[j, li] for li, layer in enumerate(layers)})
                data, digest = pack(tensors)
                stored += len(data)
                vec_rows.append(dict(pair_hash=h, fingerprint=ref.fingerprint, layers=layers, num_tokens=tokens,
                                     answer_start=tokens // 3, data=data, checksum=digest))
                e = torch.nn.functional.normalize(torch.randn(1, 384, generator=gen), dim=-1)
                data, digest = pack({"question": e, "answer": e.clone()})
                emb_rows.append(dict(pair_hash=h, embedder=emb.key, dim=384, data=data, checksum=digest))
            session.execute(insert(PairVectors), vec_rows)
            session.execute(insert(Embedding), emb_rows)
        rt.store.bump_revision(session)
    rt.store.dispose()
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per pair")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the stand-in model")
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="folder for the homes (default: a temp folder)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a work folder kept by --keep: its store and first export are reused, not remade")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (and print it) for --reuse")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from tests.tiny import make_model

    work = args.reuse or Path(tempfile.mkdtemp(prefix="kvdb-bench-export-", dir=args.work))
    config, src, dst, merged = work / "bench.yaml", work / "src", work / "dst", work / "out1" / "knowledge_cache.pth"
    base = ["--config", str(config)]
    try:
        if args.reuse:
            for old in (dst, work / "out2"):
                shutil.rmtree(old, ignore_errors=True)
            args.pairs, stored, populate_s, export_s, export_rss = json.loads((work / "first.json").read_text())
        else:
            model = make_model(work / "model", layers=2, hidden=args.hidden)
            config.write_text(f"model:\n  source: {model}\nbuild:\n  layers: [1, 2]\n")
            t0 = time.perf_counter()
            stored = populate(src, config, args.pairs, args.tokens, [1, 2], args.domains, seed=0)
            populate_s = time.perf_counter() - t0
            export_s, export_rss = run_measured(["--home", str(src), *base, "export", "--out", str(work / "out1")],
                                                work)
            (work / "first.json").write_text(json.dumps([args.pairs, stored, populate_s, export_s, export_rss]))
        import_s, import_rss = run_measured(["--home", str(dst), *base, "import", str(merged)], work)
        (work / "out2").mkdir()
        reexport_s, _ = run_measured(["--home", str(dst), *base, "export", "--domain", "all", "--out",
                                      str(work / "out2")], work)
        same = sha256_file(merged) == sha256_file(work / "out2" / "knowledge_cache.pth")
        result = {
            "pairs": args.pairs, "tokens_per_pair": args.tokens, "hidden": args.hidden, "layers": 2,
            "vector_bytes": stored, "cache_bytes": merged.stat().st_size,
            "populate_s": round(populate_s, 1),
            "export_s": round(export_s, 1), "export_peak_rss_bytes": export_rss,
            "import_s": round(import_s, 1), "import_peak_rss_bytes": import_rss,
            "reexport_s": round(reexport_s, 1), "reexport_identical": same,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        }
    finally:
        if args.keep or args.reuse:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.pairs} pairs, {stored / GIB:.2f} GiB of vectors ({result['cache_bytes'] / GIB:.2f} GiB cache)")
    print(f"export  {export_s:7.1f} s   peak RSS {export_rss / GIB:.2f} GiB (all + {args.domains} domain files)")
    print(f"import  {import_s:7.1f} s   peak RSS {import_rss / GIB:.2f} GiB")
    print(f"re-export of the imported home identical: {same}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
    else:
        main()
