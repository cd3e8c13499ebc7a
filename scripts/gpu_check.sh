#!/usr/bin/env bash
# One prepared check for a CUDA machine, run from a fresh checkout: the test suite, then a short bf16 `kvdb train`
# (1 epoch on a few pairs) and `kvdb bench` (a few questions) on the GPU, each step time-boxed so that the whole
# stays under 8 minutes. Logs and results go to $OUT/gpu_check (a GPU tool copies $OUT back; default
# ./var/gpu_check). Exits non-zero when a step fails or times out, when there is no CUDA device, or when the bench
# did not run on CUDA in bf16.
#
#   scripts/gpu_check.sh              on a CUDA machine
#   scripts/gpu_check.sh --dry-run    anywhere: on the CPU with a tiny model made in-process and three test files,
#                                     to check the script itself (every command and flag it uses) without a GPU
#
# Environment (all optional):
#   KVDB_PYTHON        interpreter with kvdb's dependencies [.venv/bin/python; without a .venv, `make install` makes
#                      one first (that needs the package registries and more than 8 minutes)]
#   GPU_CHECK_TESTS    test files [tests/test_*.py; dry run: three small ones], run as GPU_CHECK_SHARDS pytest
#                      processes side by side [6]; GPU_CHECK_MARK: a pytest -m expression [none: all, as make test]
#   GPU_CHECK_PAIRS    pairs of the default knowledge set to train and bench on [14, two per domain]
#   GPU_CHECK_MODEL    base model source [configs/default.yaml's: the embedded SmolLM2-135M-Instruct]
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

# Time limits in seconds (tests, add, build, train, bench: 470 in all); a CPU dry run gets four times as long.
SLOW=$((DRY_RUN ? 4 : 1))
LIMIT_TESTS=$((210 * SLOW)) LIMIT_ADD=$((20 * SLOW)) LIMIT_BUILD=$((60 * SLOW)) LIMIT_TRAIN=$((90 * SLOW))
LIMIT_BENCH=$((90 * SLOW))

RESULTS="${OUT:-$ROOT/var}/gpu_check"
rm -rf "$RESULTS"  # this script's own folder: no result of an earlier run is mistaken for this one's
mkdir -p "$RESULTS"
: >"$RESULTS/summary.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvdb-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's kvdb, whichever venv runs it
export HF_HUB_OFFLINE=1 KVDB_HOME="$WORK/home"
unset KVDB_CONFIG KVDB_DATABASE_URL
FAILED=()
START=$SECONDS

say() { printf '\n== %s (%ds)\n' "$*" "$((SECONDS - START))" | tee -a "$RESULTS/summary.txt"; }

fail() {  # fail NAME RC LIMIT LOG
    local why="exit $2"
    [ "$2" -eq 124 ] && why="timed out after $3s"
    FAILED+=("$1 ($why)")
    echo "FAILED: $1, $why; see $4" | tee -a "$RESULTS/summary.txt"
}

# step NAME LIMIT CMD...: stdout to NAME.out, stderr to NAME.log; a failure is recorded and returns non-zero.
step() {
    local name=$1 limit=$2 rc
    shift 2
    say "$name: $*"
    timeout "$limit" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log"
    rc=$?
    tail -n 4 "$RESULTS/$name.log"
    [ "$rc" -eq 0 ] || fail "$name" "$rc" "$limit" "$RESULTS/$name.log"
    return "$rc"
}

# The suite as shards of test files, one pytest process each, side by side (each test process uses one thread).
run_tests() {
    local files shards pids=() rc=0 i j
    if [ -n "${GPU_CHECK_TESTS:-}" ]; then
        read -r -a files <<<"$GPU_CHECK_TESTS"
    elif [ "$DRY_RUN" -eq 1 ]; then
        files=(tests/test_config.py tests/test_fileio.py tests/test_logs.py)
    else
        files=(tests/test_*.py)
    fi
    shards=${GPU_CHECK_SHARDS:-6}
    say "tests: ${#files[@]} files in $shards pytest processes${GPU_CHECK_MARK:+, -m '$GPU_CHECK_MARK'}"
    for ((i = 0; i < shards && i < ${#files[@]}; i++)); do
        local mine=()
        for ((j = i; j < ${#files[@]}; j += shards)); do mine+=("${files[j]}"); done
        timeout "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider ${GPU_CHECK_MARK:+-m "$GPU_CHECK_MARK"} \
            "${mine[@]}" >"$RESULTS/tests.$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" && continue
        rc=$?
        fail "tests shard $i" "$rc" "$LIMIT_TESTS" "$RESULTS/tests.$i.log"
    done
    for log in "$RESULTS"/tests.*.log; do echo "$(basename "$log"): $(tail -n 1 "$log")"; done
}

PY=${KVDB_PYTHON:-}
if [ -z "$PY" ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi

# -- 1. the machine ------------------------------------------------------------------------------------------------
if [ -z "$PY" ]; then  # `make test` without its pytest run, which comes below in shards
    say "make install: no .venv yet (needs the package registries; not time-boxed, not counted in the 8 minutes)"
    if ! make install >"$RESULTS/install.log" 2>&1; then
        echo "gpu_check: make install failed; see $RESULTS/install.log" >&2
        exit 1
    fi
    PY=.venv/bin/python
fi
say "machine"
"$PY" - <<'EOF' | tee "$RESULTS/machine.txt"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"CUDA device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 supported: {torch.cuda.is_bf16_supported()}")
else:
    print("no CUDA device")
EOF
if [ "$DRY_RUN" -eq 0 ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device here; scripts/gpu_check.sh --dry-run checks the script on a CPU" >&2
    exit 2
fi

# -- 2. the test suite ---------------------------------------------------------------------------------------------
run_tests

# -- 3. a short bf16 train and bench -------------------------------------------------------------------------------
say "config"
ARGS=("$DRY_RUN" "$WORK" "${GPU_CHECK_PAIRS:-14}" "${GPU_CHECK_MODEL:-}")
"$PY" - "${ARGS[@]}" <<'EOF' 2>"$RESULTS/config.log" | tee -a "$RESULTS/summary.txt" || FAILED+=("config")
import json, sys
from pathlib import Path

import yaml

dry, work, pairs, model = sys.argv[1] == "1", Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = "cpu" if dry else "cuda"
if dry:  # a tiny model built here: the same commands and flags, in seconds on a CPU
    from tests.tiny import make_model, write_tiny_config

    base = write_tiny_config(work / "tiny.yaml", make_model(work / "tiny", layers=4, hidden=64))
else:
    base = Path("configs/default.yaml")
config = yaml.safe_load(base.read_text())
config["model"].update(dtype="bfloat16", device=device, **({"source": model} if model else {}))
(work / "kvdb.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
# A few pairs spread over the domains of the default knowledge set.
rows = [json.loads(line) for line in Path("kvdb/data/default_faq.jsonl").read_text().splitlines() if line.strip()]
by_domain = {}
for row in rows:
    by_domain.setdefault(row["domain"], []).append(row)
picked = [group[i] for i in range(len(rows)) for group in by_domain.values() if i < len(group)]  # round robin
(work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked[:pairs]))
print(f"{min(pairs, len(picked))} pairs; config:\n" + (work / "kvdb.yaml").read_text())
EOF

KVDB=("$PY" -m kvdb --config "$WORK/kvdb.yaml")
step add "$LIMIT_ADD" "${KVDB[@]}" add --file "$WORK/pairs.jsonl" --json &&
    step build "$LIMIT_BUILD" "${KVDB[@]}" -v build --json &&
    step train "$LIMIT_TRAIN" "${KVDB[@]}" -v train --epochs 1 --no-variants --json &&
    step bench "$LIMIT_BENCH" "${KVDB[@]}" -v bench --per-workload 2 -n 32 \
        --methods greedy,hf_prompt_lookup,kvdb_copy,kvdb_draft --json

# -- 4. what ran where ---------------------------------------------------------------------------------------------
if [ -s "$RESULTS/bench.out" ]; then
    say "bench report"
    "$PY" - "$RESULTS/bench.out" "$DRY_RUN" <<'EOF' | tee -a "$RESULTS/summary.txt" || FAILED+=("device/dtype")
import json, sys

from kvdb.bench import markdown_table

report, dry = json.load(open(sys.argv[1])), sys.argv[2] == "1"
print(f"{report['model']} on {report['device']} {report['dtype']}, draft: {report.get('draft') or 'none'}")
print(markdown_table(report))
wanted = "cpu" if dry else "cuda"
if not report["device"].startswith(wanted) or report["dtype"] != "bfloat16":
    sys.exit(f"the bench ran on {report['device']} {report['dtype']}, not {wanted} bfloat16")
EOF
fi

say "done; results in $RESULTS"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}" | tee -a "$RESULTS/summary.txt"
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$RESULTS/summary.txt"
