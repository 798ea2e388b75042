#!/usr/bin/env bash
# Benchmarks order-service on this machine and writes docs/BENCHMARKS-app.md.
#
#   app/bench/run.sh                 # builds the release binaries first
#   BENCH_SKIP_BUILD=1 app/bench/run.sh
#
# Needs the local PostgreSQL, Redis and RabbitMQ (.ci/run starts them), psql and curl. Uses a
# fresh database order_bench_<ts> and exchange/queue prefix bench-<ts>, removed at the end.
# Knobs: BENCH_CONCURRENCY (64), BENCH_SECONDS (20), BENCH_RELAY_EVENTS (100000),
# BENCH_PAYMENTS (20000), CARGO_TARGET_DIR (target).
set -euo pipefail
cd "$(dirname "$0")/../.."

CONCURRENCY=${BENCH_CONCURRENCY:-64}
SECONDS_RUN=${BENCH_SECONDS:-20}
RELAY_EVENTS=${BENCH_RELAY_EVENTS:-100000}
PAYMENTS=${BENCH_PAYMENTS:-20000}
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/release/order-service"
LOAD="$TARGET/release/order-load"
OUT=docs/BENCHMARKS-app.md

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  cargo build --release -p order-service --bins
fi

TS=$(date +%s)
DB="order_bench_$TS"
PREFIX="bench-$TS"
PG_ADMIN=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB_URL="${PG_ADMIN%/*}/$DB"
GRPC=127.0.0.1:18080
METRICS=127.0.0.1:19091
LOG=$(mktemp /tmp/order-bench-XXXX.log)
EVENTS_QUEUE="$PREFIX.bench.events"

psql_db() { psql -X -q -At "$DB_URL" -c "$1"; }
metric() { # name-with-labels prefix → value (sum of matching lines)
  curl -s "http://$METRICS/metrics" | awk -v p="$1" 'index($0, p) == 1 { s += $NF } END { printf "%.0f", s }'
}
# p-quantile upper bound of a histogram from /metrics: quantile name-prefix(without _bucket)
hist_quantile() {
  curl -s "http://$METRICS/metrics" | awk -v q="$1" -v p="$2_bucket" '
    index($0, p) == 1 { match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); c[le] += $NF; if (!(le in seen)) { seen[le] = 1; order[n++] = le } }
    END { total = c["+Inf"]; if (total == 0) { print "n/a"; exit } for (i = 0; i < n; i++) if (c[order[i]] >= q * total) { print order[i]; exit } }'
}

cleanup() {
  if [ -n "${PID:-}" ] && kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID" 2>/dev/null || true; fi
  "$LOAD" --mq-prefix "$PREFIX" --delete-queues "$EVENTS_QUEUE" >/dev/null 2>&1 || true
  psql -X -q "$PG_ADMIN" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
echo "starting order-service (database $DB, prefix $PREFIX, log $LOG)"
DATABASE_URL=$DB_URL APP_GRPC_ADDR=$GRPC APP_METRICS_ADDR=$METRICS APP_MQ_PREFIX=$PREFIX \
  APP_REDIS_PREFIX="$PREFIX:" APP_LOG_FORMAT=json RUST_LOG=warn,order_service=info \
  "$BIN" 2>"$LOG" &
PID=$!
for _ in $(seq 1 200); do curl -sf "http://$METRICS/metrics" >/dev/null && break; sleep 0.1; done
curl -sf "http://$METRICS/metrics" >/dev/null || { echo "order-service did not start:"; cat "$LOG"; exit 1; }
"$LOAD" --mq-prefix "$PREFIX" --bind-events-queue "$EVENTS_QUEUE" >/dev/null

echo "1/4 CreateOrder, $CONCURRENCY concurrent callers, ${SECONDS_RUN}s"
CREATE=$("$LOAD" --addr "http://$GRPC" --mode create --concurrency "$CONCURRENCY" --duration "${SECONDS_RUN}s")
echo "$CREATE"
LAG_P50=$(hist_quantile 0.50 'outbox_relay_lag_seconds')
LAG_P99=$(hist_quantile 0.99 'outbox_relay_lag_seconds')

echo "   CreateOrder with idempotency keys (Redis SET NX per call)"
CREATE_IDEM=$("$LOAD" --addr "http://$GRPC" --mode create --idempotency --concurrency "$CONCURRENCY" --duration "$((SECONDS_RUN / 2))s")
echo "$CREATE_IDEM"

echo "2/4 GetOrder, $CONCURRENCY concurrent callers, $((SECONDS_RUN / 2))s"
GET=$("$LOAD" --addr "http://$GRPC" --mode get --concurrency "$CONCURRENCY" --duration "$((SECONDS_RUN / 2))s")
echo "$GET"

echo "3/4 outbox relay: $RELAY_EVENTS committed events at once"
for _ in $(seq 1 600); do [ "$(psql_db 'SELECT count(*) FROM outbox WHERE sent_at IS NULL')" = 0 ] && break; sleep 0.1; done
BEFORE=$(metric outbox_published_total)
START=$(date +%s.%N)
psql_db "INSERT INTO outbox (event_id, aggregate_id, event_type, payload)
         SELECT gen_random_uuid(), gen_random_uuid(), 'order.created',
                jsonb_build_object('order_id', gen_random_uuid(), 'status', 'pending', 'total_cents', 4497)
         FROM generate_series(1, $RELAY_EVENTS)"
INSERTED=$(date +%s.%N)
for _ in $(seq 1 6000); do
  [ "$(metric outbox_published_total)" -ge $((BEFORE + RELAY_EVENTS)) ] && break
  sleep 0.05
done
DONE=$(date +%s.%N)
RELAY_S=$(echo "$DONE - $INSERTED" | bc -l)
RELAY_RATE=$(echo "$RELAY_EVENTS / $RELAY_S" | bc -l)
printf '   relayed %d events in %.2fs: %.0f events/s\n' "$RELAY_EVENTS" "$RELAY_S" "$RELAY_RATE"

echo "4/4 consumer: $PAYMENTS payment messages"
PAY=$("$LOAD" --addr "http://$GRPC" --publish-payments "$PAYMENTS" --concurrency "$CONCURRENCY" --mq-prefix "$PREFIX" --metrics-addr "$METRICS")
echo "$PAY"

echo "stopping (SIGTERM): the nine steps' app side"
kill -TERM "$PID"
STOP_START=$(date +%s.%N)
wait "$PID" && CODE=0 || CODE=$?
STOP_S=$(echo "$(date +%s.%N) - $STOP_START" | bc -l)
PID=

j() { echo "$1" | python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$2"; }
CPU=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
PGV=$(psql -X -At "$PG_ADMIN" -c 'SHOW server_version')
RMQ=$(rabbitmqctl version 2>/dev/null || echo "?")
REDISV=$(redis-server --version | awk '{ print $3 }' | cut -d= -f2)

cat >"$OUT" <<EOF
# order-service benchmarks

Measured by \`app/bench/run.sh\` on $(date -u +%Y-%m-%d) (commit $(git rev-parse --short HEAD)).
Machine: $(nproc) vCPU ($CPU), $MEM RAM, $(uname -sr); PostgreSQL $PGV, Redis $REDISV,
RabbitMQ $RMQ, all on the same machine as the service and the load generator (so every number
below shares the two cores among the service, PostgreSQL, RabbitMQ, Redis and \`order-load\`;
the 1-minute load average was $LOAD_BEFORE when the run started, i.e. other work was running too).
Release build (\`opt-level="s"\`, fat LTO), default configuration (pool 32, outbox batch 500,
prefetch 256, 32 concurrent handlers). PostgreSQL runs with its Debian defaults
(\`synchronous_commit=on\`, one fsync per commit).

| what | result | target |
|---|---|---|
| CreateOrder, $CONCURRENCY concurrent callers, ${SECONDS_RUN}s | **$(j "$CREATE" 'int(d["throughput_rps"])') orders/s**, p50 $(j "$CREATE" 'd["latency_ms"]["p50"]') ms, p99 $(j "$CREATE" 'd["latency_ms"]["p99"]') ms, $(j "$CREATE" 'd["ok"]') ok, failed $(j "$CREATE" 'sum(d["failed"].values())') | ≥ 2,000/s |
| CreateOrder with idempotency key (Redis SET NX + SET) | $(j "$CREATE_IDEM" 'int(d["throughput_rps"])') orders/s, p50 $(j "$CREATE_IDEM" 'd["latency_ms"]["p50"]') ms, p99 $(j "$CREATE_IDEM" 'd["latency_ms"]["p99"]') ms | |
| GetOrder, $CONCURRENCY concurrent callers | $(j "$GET" 'int(d["throughput_rps"])') calls/s, p50 $(j "$GET" 'd["latency_ms"]["p50"]') ms, p99 $(j "$GET" 'd["latency_ms"]["p99"]') ms | |
| outbox relay lag during the CreateOrder run (commit → broker confirm; the relay shares the CPU with the load) | p50 ≤ ${LAG_P50} s, p99 ≤ ${LAG_P99} s (histogram bucket bounds) | |
| outbox relay, $RELAY_EVENTS events committed at once, to a bound durable queue | **$(printf '%.0f' "$RELAY_RATE") events/s** ($(printf '%.2f' "$RELAY_S") s) | ≥ 5,000/s |
| consumer, $PAYMENTS \`payment.succeeded\` messages (one transaction + ack each) | **$(j "$PAY" 'int(d.get("consume_rate", 0))') msgs/s** end to end from first publish ($(j "$PAY" 'd.get("consume_s")') s); publishing alone $(j "$PAY" 'int(d["publish_rate"])') msgs/s | |
| SIGTERM → all eight app steps → exit | $(printf '%.2f' "$STOP_S") s, exit code $CODE | |

Raw \`order-load\` output:

\`\`\`json
$CREATE
$CREATE_IDEM
$GET
$PAY
\`\`\`

Re-run: \`app/bench/run.sh\` (knobs \`BENCH_CONCURRENCY\`, \`BENCH_SECONDS\`, \`BENCH_RELAY_EVENTS\`,
\`BENCH_PAYMENTS\`).
EOF
echo "wrote $OUT"
