#!/usr/bin/env bash
# The main job end to end on the embedded default (run by `make demo`). Uses ./var unless KVDB_HOME is set.
set -euo pipefail
cd "$(dirname "$0")/.."
KVDB=.venv/bin/kvdb
step() { printf '\n== %s\n' "$*"; }

step "kvdb init --examples   (create the store, load the default knowledge set)"
$KVDB init --examples
step "kvdb init --examples   (again: identical pairs are skipped)"
$KVDB init --examples
step "kvdb domains"
$KVDB domains
step "kvdb list --domain physics"
$KVDB list --domain physics
step "kvdb stats"
$KVDB stats
