#!/usr/bin/env bash
# Initial-copy benchmark, side by side in one run on the same throwaway PostgreSQL 15 source and
# 17 target: time until every table streams for `switchyard sync` with the snapshot copy (the
# default) and with the native table sync (`[sync] copy = "native"`), beside `pg_dump -Fc |
# pg_restore` and the servers' limit for the same work (a raw `COPY TO | COPY FROM` pipe per
# table, copy_workers at once, into tables without indexes, then the same indexes built with
# pg_restore -j). Prints the table and the ratios.
#
#   bench/sync.sh                       # ~1.1 GB of testdata (BENCH_ROWS=1000000 customers)
#   BENCH_ROWS=100000 bench/sync.sh
#   BENCH_SET=single bench/sync.sh      # one table of ~1.2 GB (BENCH_ROWS=8000000 rows)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SET=${BENCH_SET:-testdata}
if [ "$SET" = single ]; then ROWS=${BENCH_ROWS:-8000000}; else ROWS=${BENCH_ROWS:-1000000}; fi
WORKERS=4

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

psql -q -v ON_ERROR_STOP=1 "$SRC/postgres" -c "CREATE DATABASE bench"
if [ "$SET" = single ]; then
  echo "generating one table of $ROWS rows ..." >&2
  psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -c "CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL, n numeric, at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX big_n ON big (n);
    INSERT INTO big (id, payload, n) SELECT i, repeat(md5(i::text), 3), i / 7.0 FROM generate_series(1, $ROWS) AS i;
    VACUUM ANALYZE big;"
  DESCRIPTION="one table of $ROWS rows"
else
  echo "generating testdata: $ROWS customers ..." >&2
  psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -f testdata/schema.sql
  sed "s/{{rows}}/$ROWS/g" testdata/data.sql | psql -q -v ON_ERROR_STOP=1 "$SRC/bench"
  DESCRIPTION="$ROWS customers; testdata/schema.sql"
fi
psql -q "$SRC/bench" -c "CHECKPOINT"
SIZE=$(psql -At "$SRC/bench" -c "SELECT pg_size_pretty(pg_database_size('bench'))")
echo "source database: $SIZE" >&2

# 1. pg_dump -Fc | pg_restore into an empty database on the target.
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench_dump"
start=$(now)
"$PG_BIN/pg_dump" -Fc --no-publications --no-subscriptions -d "$SRC/bench" | "$PG_BIN/pg_restore" --exit-on-error -d "$TGT/bench_dump"
dump_secs=$(elapsed "$start" "$(now)")
echo "pg_dump | pg_restore: ${dump_secs}s" >&2

# 2. switchyard sync, both copies: from start until every table streams.
sync_until_streaming() { # $1: database on the target, $2: extra [sync] lines
  psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE $1"
  cat > "$WORK/$1.toml" <<PLAN
name = "$1"
[source]
url = "$SRC/bench"
[target]
url = "$TGT/$1"
[sync]
poll_interval = "200ms"
copy_workers = $WORKERS
$2
[state]
path = "$WORK/$1.json"
PLAN
  local start
  start=$(now)
  "$SWITCHYARD" sync "$WORK/$1.toml" >/dev/null
  until "$SWITCHYARD" status "$WORK/$1.toml" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["tables"] and all(t["state"] == "streaming" for t in s["tables"]) else 1)'; do
    sleep 0.2
  done
  elapsed "$start" "$(now)"
  "$SWITCHYARD" abort "$WORK/$1.toml" >/dev/null
}
snapshot_secs=$(sync_until_streaming bench_snapshot "")
echo "switchyard sync (snapshot copy): ${snapshot_secs}s" >&2
native_secs=$(sync_until_streaming bench_native 'copy = "native"')
echo "switchyard sync (native table sync): ${native_secs}s" >&2

# 3. The servers' limit: the same tables piped COPY TO -> COPY FROM ($WORKERS at once; binary
#    where every column type is built in, text otherwise, as switchyard does) into tables
#    without indexes, then the same indexes and constraints built with pg_restore -j.
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench_raw"
"$PG_BIN/pg_dump" -Fc --schema-only --no-publications --no-subscriptions -d "$SRC/bench" -f "$WORK/schema.dump"
psql -At "$SRC/bench" -c "SELECT format('%I.%I', n.nspname, c.relname) || ' ' || CASE WHEN bool_and(a.atttypid < 16384) THEN '(FORMAT binary)' ELSE '' END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 WHERE c.relkind = 'r' AND n.nspname = 'public' GROUP BY 1 ORDER BY pg_relation_size(min(c.oid)) DESC" > "$WORK/tables"
export SRC TGT
start=$(now)
"$PG_BIN/pg_restore" --exit-on-error --section=pre-data -d "$TGT/bench_raw" "$WORK/schema.dump"
# shellcheck disable=SC2016
xargs -P "$WORKERS" -L 1 sh -c 'psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -c "COPY $0 TO STDOUT $1" | psql -q -v ON_ERROR_STOP=1 "$TGT/bench_raw" -c "COPY $0 FROM STDIN $1"' < "$WORK/tables"
PGOPTIONS="-c maintenance_work_mem=512MB -c max_parallel_maintenance_workers=4" \
  "$PG_BIN/pg_restore" --exit-on-error --section=post-data -j "$WORKERS" -d "$TGT/bench_raw" "$WORK/schema.dump"
raw_secs=$(elapsed "$start" "$(now)")
echo "raw COPY pipe + index builds: ${raw_secs}s" >&2

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
cat <<TABLE

initial copy of $SIZE ($DESCRIPTION), PostgreSQL 15 -> 17, $(nproc) cores, $WORKERS workers
| method                                   | seconds | vs snapshot copy |
|------------------------------------------|---------|------------------|
| switchyard sync, snapshot copy           | $(printf '%7s' "$snapshot_secs") |             1.00 |
| switchyard sync, native table sync       | $(printf '%7s' "$native_secs") | $(printf '%16s' "$(ratio "$native_secs" "$snapshot_secs")") |
| pg_dump -Fc | pg_restore                 | $(printf '%7s' "$dump_secs") | $(printf '%16s' "$(ratio "$dump_secs" "$snapshot_secs")") |
| raw COPY pipe, then index builds         | $(printf '%7s' "$raw_secs") | $(printf '%16s' "$(ratio "$raw_secs" "$snapshot_secs")") |
floors: native / snapshot >= 1.3, pg_dump / snapshot > 1.0, snapshot / raw <= 1.2 ($(ratio "$snapshot_secs" "$raw_secs"))
TABLE
