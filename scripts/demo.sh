#!/usr/bin/env bash
# The demo: starts a throwaway PostgreSQL 15 source and PostgreSQL 17 target on free loopback
# ports, loads testdata into the source, and runs `switchyard plan`, `sync --wait`, `status`,
# `validate` and `abort`.
# Everything it starts stops when it ends. DEMO_ROWS sets the data size (default 50000).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${DEMO_ROWS:-50000}

scripts/install-deps.sh
cargo build --quiet --bin switchyard --example servers
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

cat > "$WORK/shop.toml" <<PLAN
name = "shop"
[source]
url = "postgres://postgres@127.0.0.1:$SOURCE_PORT/shop"   # password from PGPASSWORD
[target]
url = "postgres://postgres@127.0.0.1:$TARGET_PORT/shop"
[sync]
tables = ["public.*"]
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
step "switchyard abort shop.toml (removes slot, publication and subscription)"
"$SWITCHYARD" abort shop.toml
step "Done. The demo servers stop now."
