#!/usr/bin/env bash
# Initial-copy benchmark: time from `switchyard sync` start until every table streams, beside
# `pg_dump -Fc | pg_restore` of the same tables into an empty database, on the same throwaway
# PostgreSQL 15 source and 17 target, in one run. Prints both and the ratio.
#
#   bench/sync.sh            # ~1.1 GB of testdata (BENCH_ROWS=1000000 customers)
#   BENCH_ROWS=100000 bench/sync.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${BENCH_ROWS:-1000000}

scripts/install-deps.sh
# Two builds: with the example in the same one, cargo would also turn on the dev-dependencies'
# features (tokio's test-util, whose clock takes a lock on every read) in the binary.
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
SWITCHYARD="$ROOT/target/release/switchyard"
PG_BIN=/usr/lib/postgresql/15/bin

WORK=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT"
TGT="postgres://postgres@127.0.0.1:$TARGET_PORT"

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.1f}')"; }

echo "generating testdata: $ROWS customers ..." >&2
psql -q -v ON_ERROR_STOP=1 "$SRC/postgres" -c "CREATE DATABASE bench"
psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -f testdata/schema.sql
sed "s/{{rows}}/$ROWS/g" testdata/data.sql | psql -q -v ON_ERROR_STOP=1 "$SRC/bench"
psql -q "$SRC/bench" -c "CHECKPOINT"
SIZE=$(psql -At "$SRC/bench" -c "SELECT pg_size_pretty(pg_database_size('bench'))")
echo "source database: $SIZE" >&2

# 1. pg_dump -Fc | pg_restore into an empty database on the target.
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench_dump"
start=$(now)
"$PG_BIN/pg_dump" -Fc --no-publications --no-subscriptions -d "$SRC/bench" | "$PG_BIN/pg_restore" --exit-on-error -d "$TGT/bench_dump"
dump_secs=$(elapsed "$start" "$(now)")
echo "pg_dump | pg_restore: ${dump_secs}s" >&2

# 2. switchyard sync: from start until every table streams.
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench"
cat > "$WORK/bench.toml" <<PLAN
name = "bench"
[source]
url = "$SRC/bench"
[target]
url = "$TGT/bench"
[sync]
poll_interval = "200ms"
[state]
path = "$WORK/bench.json"
PLAN
start=$(now)
"$SWITCHYARD" sync "$WORK/bench.toml" >/dev/null
until "$SWITCHYARD" status "$WORK/bench.toml" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["tables"] and all(t["state"] == "streaming" for t in s["tables"]) else 1)'; do
  sleep 0.2
done
sync_secs=$(elapsed "$start" "$(now)")
echo "switchyard sync: ${sync_secs}s" >&2
"$SWITCHYARD" abort "$WORK/bench.toml" >/dev/null

ratio=$(python3 -c "print(f'{$sync_secs / $dump_secs:.2f}')")
cat <<TABLE

initial copy of $SIZE ($ROWS customers; testdata/schema.sql), PostgreSQL 15 -> 17, $(nproc) cores
| method                          | seconds | vs pg_dump |
|---------------------------------|---------|------------|
| pg_dump -Fc | pg_restore        | $(printf '%7s' "$dump_secs") |       1.00 |
| switchyard sync (to streaming)  | $(printf '%7s' "$sync_secs") | $(printf '%10s' "$ratio") |
TABLE
