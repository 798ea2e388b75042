#!/usr/bin/env bash
# Runs the reference order service under quiesce against the local PostgreSQL, Redis and RabbitMQ
# (the README's main command). Ctrl-C (or `quiesce ctl shutdown --admin-socket /tmp/quiesce-local/admin.sock`)
# runs the nine-step stop; the summary lands in /tmp/quiesce-local/termination-log.
#
#   probes:   grpc 127.0.0.1:50051 (services liveness, readiness, startup)
#   metrics:  http://127.0.0.1:9090/metrics (quiesce), http://127.0.0.1:9091/metrics (app)
#   API:      grpc 127.0.0.1:8080 (order.v1.OrderService; try target/debug/order-load)
set -euo pipefail
cd "$(dirname "$0")/.."

down=()
pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null ||
  down+=("PostgreSQL on 127.0.0.1:5432: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start")
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 ||
  down+=("Redis on 127.0.0.1:6379: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no")
(exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null ||
  down+=("RabbitMQ on 127.0.0.1:5672: rabbitmq-server -detached")
if [ ${#down[@]} -gt 0 ]; then
  echo "run-local: a dependency is not running; start it, then run this again:" >&2
  printf '  - %s\n' "${down[@]}" >&2
  exit 1
fi

cargo build --quiet -p quiesce -p order-service
mkdir -p /tmp/quiesce-local
exec target/debug/quiesce --config deploy/local/quiesce.toml -- target/debug/order-service "$@"
