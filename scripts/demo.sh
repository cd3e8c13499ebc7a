#!/usr/bin/env bash
# The main job end to end on the embedded default (run by `make demo`). Uses ./var unless KVDB_HOME is set.
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
step "kvdb compare"
$KVDB compare "Plants turn light, water and carbon dioxide into sugar." "Photosynthesis makes glucose from sunlight."
step "kvdb stats"
$KVDB stats
