#!/usr/bin/env bash
# Cutover benchmark: pgbench (tpcb-like, 16 clients, through `switchyard proxy`, every
# transaction logged) runs twice on a PostgreSQL 15 source replicated to a PostgreSQL 17
# target: once without a cutover (the control: on 2 cores a checkpoint alone can stall a
# transaction) and once with `switchyard cutover` in the middle. Prints the pause the proxy
# measured, the longest transaction of both runs, failed transactions, and pgbench_history's
# rows on the target against the transactions pgbench reports as committed.
#
# Floors (issue 5): zero failed and zero lost transactions; a pause under 250 ms; the longest
# transaction of the cutover run at most the control's plus 250 ms.
#
#   bench/cutover.sh                    # 60 s per run, scale 10
#   BENCH_SECONDS=20 BENCH_SCALE=5 bench/cutover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECS=${BENCH_SECONDS:-60}
SCALE=${BENCH_SCALE:-10}
CLIENTS=${BENCH_CLIENTS:-16}
# Server connections per user: on 2 cores shared by pgbench, both servers and the proxy, a
# pool of 8 gives the source as many transactions per second as 16 and leaves the target's
# apply worker CPU to keep up with them.
POOL=${BENCH_POOL:-8}

scripts/install-deps.sh
# Two builds: with the example in the same one, cargo would also turn on the dev-dependencies'
# features (tokio's test-util, whose clock takes a lock on every read) in the binary.
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
PG_BIN=/usr/lib/postgresql/15/bin
SWITCHYARD="$ROOT/target/release/switchyard"

WORK=$(mktemp -d /tmp/switchyard-bench-cutover.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
trap 'kill $PROXY_PID 2>/dev/null || true; stop_servers' EXIT
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT"
TGT="postgres://postgres@127.0.0.1:$TARGET_PORT"

echo "pgbench -i -s $SCALE on the source ..." >&2
psql -q -v ON_ERROR_STOP=1 "$SRC/postgres" -c "CREATE DATABASE bench"
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench"
"$PG_BIN/pgbench" -q -i -s "$SCALE" "$SRC/bench" >/dev/null 2>&1
APP_PASSWORD=bench-app-pw
# pgbench_history gets a primary key so that it replicates; the application role owns nothing
# (an owner could not be fenced).
psql -q -v ON_ERROR_STOP=1 "$SRC/bench" <<SQL
ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY;
CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD';
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app;
SQL

PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
export SWITCHYARD_ADMIN_TOKEN=bench-admin-token APP_PASSWORD
cat > "$WORK/bench.toml" <<PLAN
name = "bench"
[source]
url = "$SRC/bench"
[target]
url = "$TGT/bench"
[sync]
# pgbench at full speed on 2 cores outruns the target's single apply worker: the lag is tens
# of MB when the cutover starts. The throttle before the pause drains it (settle_max_active).
max_lag_bytes = 134217728
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
pool_mode = "transaction"
pool_size = $POOL
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/state.json"
PLAN

RUST_LOG=info "$SWITCHYARD" proxy "$WORK/bench.toml" 2> "$WORK/proxy.log" &
PROXY_PID=$!
echo "sync and validate ..." >&2
"$SWITCHYARD" sync "$WORK/bench.toml" --wait --timeout 10m >/dev/null 2>&1
"$SWITCHYARD" validate "$WORK/bench.toml" >/dev/null

APP="postgres://app:$APP_PASSWORD@127.0.0.1:$PROXY_PORT/bench"
count() { psql -At "$1/bench" -c "SELECT count(*) FROM pgbench_history"; }

# Runs pgbench for SECS seconds with per-transaction logs in $WORK/$1; prints nothing.
run_pgbench() {
  mkdir -p "$WORK/$1"
  (cd "$WORK/$1" && "$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -T "$SECS" -l "$APP" > out.txt 2> err.txt) || true
}
processed() { awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' "$WORK/$1/out.txt"; }
failed() { awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' "$WORK/$1/out.txt"; }
# Longest transaction latency in ms, from the per-transaction logs (third field, in µs).
longest() { cat "$WORK/$1"/pgbench_log.* | awk '$3 > max {max = $3} END {printf "%.1f", max / 1000}'; }

echo "control run: $SECS s, no cutover ..." >&2
run_pgbench control

# What the control run wrote is applied before the second run starts.
"$SWITCHYARD" sync "$WORK/bench.toml" --wait --timeout 10m >/dev/null 2>&1
echo "cutover run: $SECS s, cutover after $((SECS / 2)) s ..." >&2
before=$(count "$SRC")
run_pgbench cutover &
BENCH_PID=$!
sleep $((SECS / 2))
psql -At "$SRC/bench" -c "SELECT 'lag before the cutover: ' || pg_size_pretty(pg_current_wal_lsn() - confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 'switchyard_bench'" >&2
"$SWITCHYARD" cutover "$WORK/bench.toml" --yes > "$WORK/cutover.out" 2> "$WORK/cutover.err" || {
  cat "$WORK/cutover.out" "$WORK/cutover.err" >&2
  exit 1
}
wait $BENCH_PID
after_target=$(count "$TGT")

pause=$(sed -n 's/.*Pause seen by the applications: \([0-9.]*\) ms.*/\1/p' "$WORK/cutover.out")
committed=$(processed cutover)
lost=$((before + committed - after_target))
echo
echo "cutover steps (ms):"
sed 's/^/  /' "$WORK/cutover.err" | grep -v '^\s*\[' || true
echo
printf '%-42s %12s %12s\n' "" "control" "cutover"
printf '%-42s %12s %12s\n' "transactions committed" "$(processed control)" "$committed"
printf '%-42s %12s %12s\n' "failed transactions" "$(failed control)" "$(failed cutover)"
printf '%-42s %12s %12s\n' "client errors (pgbench stderr)" "$(grep -c -i error "$WORK/control/err.txt" || true)" "$(grep -c -i error "$WORK/cutover/err.txt" || true)"
printf '%-42s %12s %12s\n' "longest transaction (ms)" "$(longest control)" "$(longest cutover)"
printf '%-42s %12s %12s\n' "pause seen by the proxy (ms)" "-" "$pause"
printf '%-42s %12s %12s\n' "pgbench_history rows on the target" "-" "$after_target (expected $((before + committed)))"
printf '%-42s %12s %12s\n' "lost transactions" "-" "$lost"
