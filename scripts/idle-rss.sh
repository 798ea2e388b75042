#!/usr/bin/env bash
# Idle memory of a quiesce binary as PID 1 of a fresh PID namespace (signal mode, the admin socket on):
# prints `VmRSS RssAnon` in kB, read 1 s after the start, then stops it. Root only (unshare).
#
#   scripts/idle-rss.sh target/x86_64-unknown-linux-gnu/release/quiesce
#   scripts/idle-rss.sh BIN OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317   # extra environment
#
# For before/after comparisons of one change; the side-by-side run with tini and the others is
# `cargo bench -p quiesce --bench init_compare` (docs/BENCHMARKS.md).
set -euo pipefail
bin=$1
shift
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
env -i PATH=/usr/bin:/bin "$@" unshare --pid --fork --mount-proc "$bin" --admin-socket "$dir/admin.sock" -- sleep 30 2>/dev/null &
outer=$!
init=
for _ in $(seq 100); do
    init=$(pgrep -P "$outer" || true)
    [ -n "$init" ] && break
    sleep 0.05
done
[ -n "$init" ] || { echo "the supervisor did not start" >&2; exit 1; }
sleep 1
grep -E '^(VmRSS|RssAnon)' "/proc/$init/status" | awk '{print $2}' | paste -sd' '
kill -TERM "$init"
wait "$outer" 2>/dev/null || true
