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
#   BENCH_ROUNDS=5 bench/sync.sh        # rounds of every method in turn (default 3)
#   SWITCHYARD_B=/tmp/old/switchyard bench/sync.sh   # and another build, as a row of its own
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SET=${BENCH_SET:-testdata}
if [ "$SET" = single ]; then ROWS=${BENCH_ROWS:-8000000}; else ROWS=${BENCH_ROWS:-1000000}; fi
WORKERS=4
ROUNDS=${BENCH_ROUNDS:-3}

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
    INSERT INTO big (id, payload, n) SELECT i, repeat(md5(i::text), 3), i / 7.0 FROM generate_series(1, $ROWS) AS i;"
  psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -c "VACUUM ANALYZE big"
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

# Each timed method starts from written-out servers: the one before leaves gigabytes of WAL
# whose checkpoint would otherwise land in the next one's time.
settle() {
  psql -q "$SRC/postgres" -c "CHECKPOINT"
  psql -q "$TGT/postgres" -c "CHECKPOINT"
}

# Each method is one function that prints its seconds; the rounds run them in turn
# (ABCD ABCD ...), so a slow spell of this shared machine falls on every method alike.

# pg_dump -Fc | pg_restore into an empty database on the target.
pg_dump_restore() {
  psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench_dump"
  settle
  local start secs
  start=$(now)
  "$PG_BIN/pg_dump" -Fc --no-publications --no-subscriptions -d "$SRC/bench" | "$PG_BIN/pg_restore" --exit-on-error -d "$TGT/bench_dump"
  secs=$(elapsed "$start" "$(now)")
  psql -q "$TGT/postgres" -c "DROP DATABASE bench_dump"
  echo "$secs"
}

# switchyard sync: from start until every table streams. $1: the binary, $2: extra [sync] lines.
sync_until_streaming() {
  local db=bench_sync
  psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE $db"
  cat > "$WORK/$db.toml" <<PLAN
name = "$db"
[source]
url = "$SRC/bench"
[target]
url = "$TGT/$db"
[sync]
poll_interval = "200ms"
copy_workers = $WORKERS
$2
[state]
path = "$WORK/$db.json"
PLAN
  settle
  local start secs
  start=$(now)
  "$1" sync "$WORK/$db.toml" >/dev/null
  until "$1" status "$WORK/$db.toml" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["tables"] and all(t["state"] == "streaming" for t in s["tables"]) else 1)'; do
    sleep 0.2
  done
  secs=$(elapsed "$start" "$(now)")
  "$1" abort "$WORK/$db.toml" --drop-target-data >/dev/null
  psql -q "$TGT/postgres" -c "DROP DATABASE $db"
  rm -f "$WORK/$db.json"
  echo "$secs"
}
snapshot_copy() { sync_until_streaming "$SWITCHYARD" ""; }
native_copy() { sync_until_streaming "$SWITCHYARD" 'copy = "native"'; }
# Another build to compare (SWITCHYARD_B=/path/to/switchyard): a row of its own.
other_build() { sync_until_streaming "$SWITCHYARD_B" ""; }

# The servers' limit: the same tables piped COPY TO -> COPY FROM ($WORKERS at once; binary
# where every column type is built in, text otherwise, as switchyard does) into tables without
# indexes, then the same indexes and constraints built with pg_restore -j.
"$PG_BIN/pg_dump" -Fc --schema-only --no-publications --no-subscriptions -d "$SRC/bench" -f "$WORK/schema.dump"
psql -At "$SRC/bench" -c "SELECT format('%I.%I', n.nspname, c.relname) || ' ' || CASE WHEN bool_and(a.atttypid < 16384) THEN 'binary' ELSE 'text' END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 WHERE c.relkind = 'r' AND n.nspname = 'public' GROUP BY n.nspname, c.relname, c.oid ORDER BY pg_relation_size(c.oid) DESC" > "$WORK/tables"
export SRC TGT
raw_pipe() {
  psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench_raw"
  settle
  local start secs
  start=$(now)
  "$PG_BIN/pg_restore" --exit-on-error --section=pre-data -d "$TGT/bench_raw" "$WORK/schema.dump"
  # shellcheck disable=SC2016
  xargs -P "$WORKERS" -L 1 sh -c 'psql -q -v ON_ERROR_STOP=1 "$SRC/bench" -c "COPY $0 TO STDOUT (FORMAT $1)" | psql -q -v ON_ERROR_STOP=1 "$TGT/bench_raw" -c "COPY $0 FROM STDIN (FORMAT $1)"' < "$WORK/tables"
  PGOPTIONS="-c maintenance_work_mem=512MB -c max_parallel_maintenance_workers=4" \
    "$PG_BIN/pg_restore" --exit-on-error --section=post-data -j "$WORKERS" -d "$TGT/bench_raw" "$WORK/schema.dump"
  secs=$(elapsed "$start" "$(now)")
  psql -q "$TGT/postgres" -c "DROP DATABASE bench_raw"
  echo "$secs"
}

METHODS="snapshot_copy native_copy pg_dump_restore raw_pipe"
if [ -n "${SWITCHYARD_B:-}" ]; then METHODS="$METHODS other_build"; fi
: > "$WORK/times"
for round in $(seq 1 "$ROUNDS"); do
  for method in $METHODS; do
    secs=$($method)
    echo "round $round: $method ${secs}s" >&2
    echo "$method $secs" >> "$WORK/times"
  done
done

python3 - "$WORK/times" "$SIZE" "$DESCRIPTION" "$(nproc)" "$WORKERS" "$ROUNDS" <<'PY'
import statistics, sys
path, size, description, cores, workers, rounds = sys.argv[1:]
times = {}
for line in open(path):
    method, secs = line.split()
    times.setdefault(method, []).append(float(secs))
names = {
    "snapshot_copy": "switchyard sync, snapshot copy",
    "native_copy": "switchyard sync, native table sync",
    "pg_dump_restore": "pg_dump -Fc | pg_restore",
    "raw_pipe": "raw COPY pipe, then index builds",
    "other_build": "switchyard sync, SWITCHYARD_B build",
}
med = {m: statistics.median(t) for m, t in times.items()}
# Ratios per round (the methods of one round ran side by side), then their median.
def ratio(a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
print(f"\ninitial copy of {size} ({description}), PostgreSQL 15 -> 17, {cores} cores, {workers} workers, {rounds} rounds")
print("| method                              | median s | min-max s   | vs snapshot copy (median of rounds) |")
print("|-------------------------------------|----------|-------------|-------------------------------------|")
for m in times:
    spread = f"{min(times[m]):.1f}-{max(times[m]):.1f}"
    print(f"| {names[m]:<35} | {med[m]:8.1f} | {spread:<11} | {ratio(m, 'snapshot_copy'):35.2f} |")
per_round = lambda a, b: ", ".join(f"{x / y:.2f}" for x, y in zip(times[a], times[b]))
print(f"native / snapshot per round: {per_round('native_copy', 'snapshot_copy')} (floor >= 1.3)")
print(f"pg_dump / snapshot per round: {per_round('pg_dump_restore', 'snapshot_copy')} (floor > 1.0)")
print(f"snapshot / raw pipe per round: {per_round('snapshot_copy', 'raw_pipe')} (floor <= 1.2)")
PY
