#!/usr/bin/env bash
# The main job end to end on the embedded default (run by `make demo`). Uses ./var unless KVDB_HOME is set.
# Set DEMO_EPOCHS (default 1) for a longer training run.
set -euo pipefail
cd "$(dirname "$0")/.."
KVDB=.venv/bin/kvdb
step() { printf '\n== %s\n' "$*"; }

step "kvdb init --examples   (create the store, load the default knowledge set; again adds nothing)"
$KVDB init --examples
step "kvdb domains"
$KVDB domains
step "kvdb build   (prefill every pair through SmolLM2-135M-Instruct, embed it, index it; first run converts the GGUF)"
$KVDB build
step "kvdb build   (again: nothing to do, no model loaded)"
$KVDB build
step "kvdb query \"How do green plants turn sunlight into food?\""
$KVDB query "How do green plants turn sunlight into food?"
step "kvdb query \"How long should I boil an egg?\"   (nothing in the store answers it)"
$KVDB query "How long should I boil an egg?"
step "kvdb export   (knowledge_cache.pth and one per domain)"
$KVDB export
step "kvdb train --epochs ${DEMO_EPOCHS:-1} --no-variants   (a short run of the draft model; records the base model's answer to every stored question, then answers each once on the answering engine so a verbatim ask of it is replayed)"
$KVDB train --epochs "${DEMO_EPOCHS:-1}" --no-variants
step "kvdb query --generate --vs-greedy   (stored questions verbatim, a paraphrase, an unanswerable question)"
$KVDB query --file scripts/demo_questions.jsonl --generate --vs-greedy
step "kvdb query --generate --draft-only --vs-greedy   (the draft alone, unverified, and its similarity to the verified answer)"
$KVDB query --generate --draft-only --vs-greedy -n 40 "How do green plants turn sunlight into food?"
step "kvdb compare"
$KVDB compare "Plants turn light, water and carbon dioxide into sugar." "Photosynthesis makes glucose from sunlight."
step "kvdb stats"
$KVDB stats
