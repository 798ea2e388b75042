#!/usr/bin/env bash
# Runs the reference order service under quiesce against the local PostgreSQL, Redis and RabbitMQ
# (the README's main command). Ctrl-C (or `quiesce ctl shutdown --admin-socket /tmp/quiesce-local/admin.sock`)
# runs the nine-step stop; the summary lands in /tmp/quiesce-local/termination-log.
#
# A dependency that is installed but not running is started the way .ci/run starts it (which needs the
# rights to do so, e.g. root in a dev container); one that is not installed is named with the package
# to install. `./scripts/run-local.sh --deps-only` stops after that; any other arguments go to the app.
#
#   probes:   grpc 127.0.0.1:50051 (services liveness, readiness, startup)
#   metrics:  http://127.0.0.1:9090/metrics (quiesce), http://127.0.0.1:9091/metrics (app)
#   API:      grpc 127.0.0.1:8080 (order.v1.OrderService; try target/debug/order-load)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "run-local: $*" >&2; }

# name, seconds, command...: polls the command every 0.25 s until it succeeds or the time is up.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "$name did not come up within ${secs}s"
      return 1
    fi
    sleep 0.25
  done
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping; }
mq_up() { (exec 3<>/dev/tcp/127.0.0.1/5672); }

start_pg() {
  local version
  version=$(ls /etc/postgresql 2>/dev/null | head -n1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

start_redis() {
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

start_mq() { rabbitmq-server -detached; }

missing=()
failed=()
# name, address, package, installed-test, up-test, start function, seconds to wait
ensure() {
  local name=$1 addr=$2 package=$3 installed=$4 up=$5 start=$6 secs=$7
  if "$up" >/dev/null 2>&1; then
    say "$name on $addr: running"
    return 0
  fi
  if ! eval "$installed" >/dev/null 2>&1; then
    missing+=("$name: not installed (Debian: apt-get install $package)")
    return 0
  fi
  say "$name on $addr: not running; starting it (waiting up to ${secs}s)"
  if ! "$start" >&2; then
    failed+=("$name: the start command failed (see above; it may need root)")
  elif ! wait_for "$name" "$secs" "$up"; then
    failed+=("$name: started but not answering on $addr within ${secs}s")
  else
    say "$name on $addr: up"
  fi
}

ensure PostgreSQL 127.0.0.1:5432 postgresql \
  'command -v pg_isready && command -v pg_ctlcluster && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]' \
  pg_up start_pg 60
ensure Redis 127.0.0.1:6379 redis-server 'command -v redis-server && command -v redis-cli' \
  redis_up start_redis 30
ensure RabbitMQ 127.0.0.1:5672 rabbitmq-server 'command -v rabbitmq-server' mq_up start_mq 120

if [ ${#missing[@]} -gt 0 ] || [ ${#failed[@]} -gt 0 ]; then
  say "cannot run the order service:"
  printf '  - %s\n' "${missing[@]}" "${failed[@]}" >&2
  say "(.ci/run installs and starts all three on a fresh Debian machine)"
  exit 1
fi

if [ "${1:-}" = "--deps-only" ]; then
  exit 0
fi

say "building quiesce and order-service (the first build takes a few minutes)"
cargo build -p quiesce -p order-service
mkdir -p /tmp/quiesce-local
say "starting: target/debug/quiesce --config deploy/local/quiesce.toml -- target/debug/order-service $*"
exec target/debug/quiesce --config deploy/local/quiesce.toml -- target/debug/order-service "$@"
