#!/usr/bin/env bash
# CI gates for the Go agent, run by .ci/run after the Rust tests (so target/debug/quiesce is built):
# formatting, vet, the race-enabled tests, the example's build, one full stop of the example under the
# real supervisor in control mode, and the conformance kit when it is built. Every wait has a timeout,
# and everything started here is killed on exit.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

step() { printf '\n==> go: %s\n' "$*"; }
fail() { echo "go ci: $*" >&2; exit 1; }

work="$(mktemp -d /tmp/quiesce-go-ci.XXXXXX)"
started=()
cleanup() {
  local pid
  for pid in "${started[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  # The example is started by the supervisor; any copy still running from this run's binary is ours.
  for pid in $(pgrep -f "^$work/example( |$)" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

step "gofmt"
unformatted="$(gofmt -l .)"
[ -z "$unformatted" ] || fail "not gofmt-formatted: $unformatted"

step "go vet"
go vet ./...

step "go test -race"
timeout 300 go test -race -count=1 -timeout 180s ./...

step "build the example"
go build -o "$work/example" ./example

quiesce="$root/target/debug/quiesce"
if [ ! -x "$quiesce" ]; then
  step "build the supervisor"
  (cd "$root" && cargo build -p quiesce --locked)
fi

step "one stop of the example under the supervisor"
log="$work/termination-log"
admin="$work/admin.sock"
# Its own session, so the trap can kill the whole group; --foreground so the SIGTERM below reaches the
# supervisor only (it drives the app over the control socket instead of signalling it).
setsid timeout --foreground -k 5 60 "$quiesce" \
  --control-socket "$work/control.sock" --admin-socket "$admin" --termination-log "$log" \
  --health-enabled false --metrics-enabled false --grace-period 20s --prestop-delay 0s --log-format json \
  -- "$work/example" -addr 127.0.0.1:0 -tick 100ms >"$work/stdout" 2>"$work/stderr" &
supervisor=$!
started+=("$supervisor")
connected=""
for _ in $(seq 1 120); do
  if QUIESCE_ADMIN_SOCKET="$admin" timeout 5 "$quiesce" ctl status 2>/dev/null | grep -Eq '^control: +connected'; then
    connected=1
    break
  fi
  kill -0 "$supervisor" 2>/dev/null || break
  sleep 0.25
done
[ -n "$connected" ] || { cat "$work/stderr" >&2; fail "the example never connected to the supervisor"; }
kill -TERM "$supervisor"
code=0
wait "$supervisor" || code=$?
if [ "$code" -ne 0 ] || [ ! -s "$log" ]; then
  cat "$work/stderr" >&2
  fail "the supervisor exited with $code (termination log: $(cat "$log" 2>/dev/null || echo none))"
fi
cat "$log"
head -n 1 "$log" | grep -q 'exit code 0' || fail "the termination message does not report exit code 0"
rows="$(grep -E '^ *[1-9] ' "$log" || true)"
[ "$(printf '%s\n' "$rows" | grep -c .)" -eq 9 ] || fail "expected 9 step rows in the termination message"
bad="$(printf '%s\n' "$rows" | awk '$3 != "ok"')"
[ -z "$bad" ] || fail "steps not ok: $bad"
[ ! -e "$work/control.sock" ] || fail "the example left its socket file behind"

conformance="$root/target/debug/quiesce-conformance"
if [ -x "$conformance" ]; then
  step "conformance kit against the example"
  timeout 300 "$conformance" -- "$work/example" -addr 127.0.0.1:0 -tick 100ms
else
  step "conformance kit: not built ($conformance), skipped"
fi
step "ok"
