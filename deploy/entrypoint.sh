#!/bin/sh
# Entrypoint of the pacsbridge image (installed as /usr/local/bin/pacsbridge-entrypoint).
#
# With PACSBRIDGE_INIT_DB=1 it first creates the index tables, or migrates an older database, with
# `pacsbridge init`, which is idempotent (without --force it adds only what is missing and never
# drops anything; docs/migrations.md), retrying
# while the database is not reachable yet (a compose `depends_on` only orders the starts) or
# while another container creates the same tables at the same moment; it gives up after
# PACSBRIDGE_INIT_TIMEOUT seconds (default 120), at once on a configuration error (exit 2).
# Then it runs the command (exec: the command gets the signals).
set -u

if [ "${PACSBRIDGE_INIT_DB:-0}" = "1" ]; then
    timeout="${PACSBRIDGE_INIT_TIMEOUT:-120}"
    deadline=$(( $(date +%s) + timeout ))
    tries=0
    while :; do
        # `pacsbridge init` prints the database URL, password included: mask it (COLUMNS: one line)
        out=$(COLUMNS=1000 pacsbridge init 2>&1)
        rc=$?
        [ -n "$out" ] && printf '%s\n' "$out" | sed -E 's#(://[^:/@[:space:]]*:)[^@[:space:]]*@#\1***@#g' >&2
        [ "$rc" -eq 0 ] && break
        tries=$((tries + 1))
        if [ "$rc" -eq 2 ]; then
            echo "pacsbridge-entrypoint: configuration error (see above); not starting $*" >&2
            exit 2
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "pacsbridge-entrypoint: \`pacsbridge init\` still failing after ${timeout} s ($tries tries); giving up" >&2
            exit "$rc"
        fi
        echo "pacsbridge-entrypoint: database not ready (try $tries, exit $rc); retrying in 2 s" >&2
        sleep 2
    done
fi

if [ "$#" -eq 0 ]; then
    set -- pacsbridge --help
fi
exec "$@"
