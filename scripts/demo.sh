#!/usr/bin/env bash
# The demo: starts a throwaway PostgreSQL 15 source and PostgreSQL 17 target on free loopback
# ports, loads testdata into the source, and runs `switchyard plan`, `sync --wait`, `status`,
# `validate`, then `proxy` with pgbench writing through it while `cutover` moves it to the
# target and `rollback` moves it back, and finally `abort`.
# Everything it starts stops when it ends. DEMO_ROWS sets the data size (default 50000).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${DEMO_ROWS:-50000}

scripts/install-deps.sh
# Two builds: with the example in the same one, cargo would also turn on the dev-dependencies'
# features (tokio's test-util, whose clock takes a lock on every read) in the binary.
cargo build --quiet --bin switchyard
cargo build --quiet --example servers
SWITCHYARD="$ROOT/target/debug/switchyard"

WORK=$(mktemp -d /tmp/switchyard-demo.XXXXXX)
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers debug "$WORK"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Loading testdata ($ROWS customers) into the PostgreSQL 15 source"
psql -q -v ON_ERROR_STOP=1 "$SOURCE_URL" -c "CREATE DATABASE shop"
psql -q -v ON_ERROR_STOP=1 "$TARGET_URL" -c "CREATE DATABASE shop"
psql -q -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop" -f testdata/schema.sql
sed "s/{{rows}}/$ROWS/g" testdata/data.sql | psql -q -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop"
# The application's own role: it logs in through the proxy, and the cutover fences it.
export APP_PASSWORD=demo-app-pw SWITCHYARD_ADMIN_TOKEN=demo-admin-token
psql -q -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop" \
  -c "CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD'" \
  -c "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app" \
  -c "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app"
PROXY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
# The proxy's read cache: a Redis of the demo's own.
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no > "$WORK/redis.log" 2>&1 &
REDIS_PID=$!
export CACHE_PASSWORD=demo-cache-pw

cat > "$WORK/shop.toml" <<PLAN
name = "shop"
[source]
url = "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop"   # password from PGPASSWORD
[target]
url = "postgres://postgres@127.0.0.1:$TARGET_PORT/shop"
[sync]
tables = ["public.*"]
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
[proxy.cache]
redis_url = "redis://127.0.0.1:$REDIS_PORT/"
replication_user = "switchyard_cache"
replication_password_env = "CACHE_PASSWORD"
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/shop.json"
PLAN

cd "$WORK"
step "switchyard plan shop.toml"
"$SWITCHYARD" plan shop.toml
step "switchyard sync shop.toml --wait"
"$SWITCHYARD" sync shop.toml --wait --timeout 10m
step "A write on the source, then switchyard status shop.toml"
psql -q "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop" -c "INSERT INTO customers (name) VALUES ('written after the sync')"
sleep 1
"$SWITCHYARD" status shop.toml
psql -At "postgres://postgres@127.0.0.1:$TARGET_PORT/shop" -c "SELECT 'on the target: ' || name FROM customers WHERE name = 'written after the sync'"
step "switchyard validate shop.toml (checksums on both servers; HTML report in $WORK/reports)"
"$SWITCHYARD" validate shop.toml --report "$WORK/reports"
step "A row changed behind replication's back on the target, and validate again"
psql -q "postgres://postgres@127.0.0.1:$TARGET_PORT/shop" -c "UPDATE orders SET amount = amount + 1 WHERE id = 42"
"$SWITCHYARD" validate shop.toml --tables public.orders || echo "(exit $?: differences found, as expected)"
psql -q "postgres://postgres@127.0.0.1:$TARGET_PORT/shop" -c "UPDATE orders SET amount = amount - 1 WHERE id = 42"
step "Put back, and validate again: the cutover wants a recent passing validation"
"$SWITCHYARD" validate shop.toml

step "switchyard cache setup shop.toml: the read cache's role, publication, slot and event trigger"
"$SWITCHYARD" cache setup shop.toml
step "switchyard proxy shop.toml: the application connects to it instead of the database"
"$SWITCHYARD" proxy shop.toml 2> "$WORK/proxy.log" &
PROXY_PID=$!
trap 'kill $PROXY_PID $REDIS_PID 2>/dev/null || true; stop_servers' EXIT
APP_URL="postgres://app:$APP_PASSWORD@127.0.0.1:$PROXY_PORT/shop"
for _ in $(seq 1 100); do
  psql -At "$APP_URL" -c "SELECT 'the proxy answers as ' || current_user || ', on the source'" 2>/dev/null && break
  sleep 0.1
done

step "The read cache: a read, the same read again (from Redis), a write, the read again (fresh)"
cache_hits() { curl -s "127.0.0.1:$ADMIN_PORT/cache" | python3 -c 'import json, sys; print(json.load(sys.stdin)["hits"])'; }
READ="SELECT name FROM customers WHERE id = 1"
for _ in $(seq 1 50); do  # the first sight of a statement is decided while it runs on the database
  curl -s "127.0.0.1:$ADMIN_PORT/cache" | grep -q '"consuming' && [ "$(cache_hits)" -gt 0 ] && break
  psql -At "$APP_URL" -c "$READ" >/dev/null; sleep 0.1
done
echo "read: $(psql -At "$APP_URL" -c "$READ")   (cache hits so far: $(cache_hits))"
echo "read: $(psql -At "$APP_URL" -c "$READ")   (cache hits so far: $(cache_hits))"
# One session: its own write is never answered from before it (read-your-writes).
echo "after an UPDATE through the proxy, the same session reads: $(psql -qAt "$APP_URL" -c "UPDATE customers SET name = 'renamed through the proxy' WHERE id = 1" -c "$READ")"
psql -q "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop" -c "UPDATE customers SET name = 'renamed on the source directly' WHERE id = 1"
sleep 0.2
echo "after an UPDATE straight on the source, read: $(psql -At "$APP_URL" -c "$READ")"
echo "INSERT INTO customers (name) VALUES ('written through the proxy');" > "$WORK/insert.sql"
# Runs `switchyard <command> shop.toml --yes` while pgbench writes through the proxy, then
# prints what pgbench saw.
while_writing() {
  local command=$1 what=$2
  /usr/lib/postgresql/15/bin/pgbench -n -c 4 -T 6 -f "$WORK/insert.sql" "$APP_URL" > "$WORK/pgbench-$command.txt" 2>&1 &
  local bench=$!
  sleep 2
  step "switchyard $command shop.toml --yes ($what)"
  "$SWITCHYARD" "$command" shop.toml --yes
  wait $bench || true
  grep -E "actually processed|failed|error|aborted" "$WORK/pgbench-$command.txt" | head -5 || true
}

while_writing cutover "pgbench keeps writing through the proxy"
psql -At "postgres://postgres@127.0.0.1:$TARGET_PORT/shop" -c "SELECT 'rows written through the proxy, on the target: ' || count(*) FROM customers WHERE name = 'written through the proxy'"
psql -At "postgres://app:$APP_PASSWORD@127.0.0.1:$SOURCE_PORT/shop" -c "INSERT INTO customers (name) VALUES ('straight to the old source')" 2>&1 | sed 's/^/the fenced source says: /' || true

while_writing rollback "back to the source, with every write made on the target"
psql -At "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop" -c "SELECT 'rows written through the proxy, on the source: ' || count(*) FROM customers WHERE name = 'written through the proxy'"

step "switchyard abort shop.toml (gives the target its grants back; removes what is left)"
"$SWITCHYARD" abort shop.toml
step "Done. The demo servers stop now."
