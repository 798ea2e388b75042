#!/usr/bin/env bash
# The end-to-end reliability suite: builds quiesce and order-service in release, runs every
# full variant of the `e2e` package (tests/) one at a time — termination under load, the
# consumer step hanging, the app crashing mid-sequence, a rolling update, then the two faults
# that stop shared services (PostgreSQL, RabbitMQ), last — and writes their figures, with the
# date and the machine, between the markers in docs/RELIABILITY.md.
#
#   scripts/reliability.sh                # everything
#   scripts/reliability.sh --skip-shared  # leave PostgreSQL and RabbitMQ running (other tests use them)
#
# Needs root (PID namespaces), util-linux (unshare, nsenter) and the local services as .ci/run
# starts them. Exit status: 0 when every variant passed.
set -uo pipefail
cd "$(dirname "$0")/.."

skip_shared=0
for arg in "$@"; do
  case "$arg" in
    --skip-shared) skip_shared=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "reliability.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

pg_version=$(ls /etc/postgresql 2>/dev/null | head -n1)
restore_services() {
  # The shared-service variants restart what they stop even when they fail; this is the belt
  # to those braces, for a run interrupted between the stop and the guard.
  pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect "${pg_version:-15}" main start || true
  (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || rabbitmqctl start_app >/dev/null 2>&1 || true
}
trap restore_services EXIT

pg_isready -q -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not running: pg_ctlcluster --skip-systemctl-redirect ${pg_version:-15} main start" >&2; exit 1; }
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { echo "Redis is not running (see .ci/run)" >&2; exit 1; }
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "RabbitMQ is not running: rabbitmq-server -detached" >&2; exit 1; }

echo "==> building (release)"
cargo build --release -p quiesce -p order-service --bins || exit 1
cargo test --release -p e2e --no-run || exit 1

report=$(mktemp -d)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
status=0
run() { # test name, label
  local name=$1 label=$2
  echo "==> $label ($name)"
  if E2E_REPORT_DIR="$report" cargo test --release -p e2e --test full -- --ignored --exact "$name"; then
    echo "$label: passed" >> "$report/status"
  else
    echo "$label: FAILED" >> "$report/status"
    status=1
  fi
}
run full_termination_under_load "termination under load"
run full_consumer_step_hangs "the consumer step hangs"
run full_app_crashes_mid_sequence "the app crashes mid-sequence"
run full_rolling_update "rolling update"
if [ "$skip_shared" = 0 ]; then
  # These two stop services every test on the machine shares: alone, last.
  run shared_services_postgres_stops_mid_drain "PostgreSQL stops mid-drain"
  run shared_services_rabbitmq_restarts_before_termination "RabbitMQ restarts before the termination"
else
  echo "PostgreSQL stops mid-drain, RabbitMQ restarts: not run (--skip-shared)" >> "$report/status"
fi
restore_services

cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
{
  echo "<!-- figures:begin (written by scripts/reliability.sh; edit the text outside the markers) -->"
  echo
  echo "Run of \`scripts/reliability.sh\` on $started at commit \`$(git rev-parse --short HEAD)\`; machine: $(nproc) cores (${cpu:-unknown CPU}), $mem, Linux $(uname -r), load average at start $load_start; release build."
  echo
  sed 's/^/- /' "$report/status"
  echo
  for f in "$report"/*.md; do
    [ -e "$f" ] || continue
    cat "$f"
    echo
  done
  echo "<!-- figures:end -->"
} > "$report/figures"

doc=docs/RELIABILITY.md
if [ -f "$doc" ] && grep -q '<!-- figures:begin' "$doc"; then
  awk -v figures="$report/figures" '
    /<!-- figures:begin/ { while ((getline line < figures) > 0) print line; skip = 1; next }
    /<!-- figures:end/ { skip = 0; next }
    !skip { print }
  ' "$doc" > "$report/doc" && cp "$report/doc" "$doc"
else
  cat "$report/figures" >> "$doc"
fi
echo "==> figures written to $doc"
cat "$report/status"
rm -rf "$report"
exit $status
