#!/usr/bin/env bash
# PostgreSQL for the tests (run by `make test`).
#
#   scripts/postgres.sh install   install Debian's `postgresql` package unless initdb is already there
#                                 (/usr/lib/postgresql/*/bin or PATH); uses sudo when not root and sudo exists.
#   scripts/postgres.sh check     say whether the server binaries are there
#
# It never fails the build: where PostgreSQL cannot be installed it says why and exits 0, and the PostgreSQL tests
# are then skipped with that reason (tests/pgserver.py starts and stops a throwaway server; nothing runs here).
set -uo pipefail

find_initdb() {
    local found
    found=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$found" ]; then echo "$found"; return 0; fi
    command -v initdb 2>/dev/null
}

skip() {
    echo "postgres.sh: $*; the PostgreSQL tests will be skipped" >&2
    exit 0
}

case "${1:-install}" in
    check)
        if initdb=$(find_initdb); then echo "PostgreSQL: $initdb"; else echo "PostgreSQL: not installed"; fi
        ;;
    install)
        if initdb=$(find_initdb); then
            echo "PostgreSQL already installed ($initdb)"
            exit 0
        fi
        command -v apt-get >/dev/null 2>&1 || skip "PostgreSQL is not installed and there is no apt-get to install it"
        if [ "$(id -u)" -eq 0 ]; then
            SUDO=""
        elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            skip "PostgreSQL is not installed, and installing it needs root (or password-less sudo)"
        fi
        echo "installing PostgreSQL from Debian's packages (apt-get install postgresql)"
        export DEBIAN_FRONTEND=noninteractive
        if ! $SUDO apt-get install -y --no-install-recommends postgresql >/dev/null; then
            # The package lists may be missing or stale (a fresh container): refresh them once and retry.
            $SUDO apt-get update -q >/dev/null || skip "apt-get update failed (no network or no package sources?)"
            $SUDO apt-get install -y --no-install-recommends postgresql >/dev/null \
                || skip "apt-get install postgresql failed"
        fi
        initdb=$(find_initdb) || skip "the postgresql package installed no initdb"
        echo "PostgreSQL installed ($initdb)"
        ;;
    *)
        echo "usage: $0 install|check" >&2
        exit 2
        ;;
esac
