#!/usr/bin/env bash
# Validation benchmark: a table of BENCH_ROWS rows (default 5 M, testdata/bench.sql) on the
# PostgreSQL 15 source and the PostgreSQL 17 target, compared in one run by
#   - switchyard validate (clean, then with 100 scattered differences injected),
#   - data-diff's checksum SQL: per segment, sum of md5(concatenated columns) truncated,
#   - pgcopydb compare data's SQL: sum(hashtext(row::text)) per table,
# each over both servers at once, as rows (per side) per second of wall time.
#
#   bench/validate.sh
#   BENCH_ROWS=1000000 BENCH_JOBS=2 bench/validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROWS=${BENCH_ROWS:-5000000}
JOBS=${BENCH_JOBS:-2}

scripts/install-deps.sh
# Two builds: with the example in the same one, cargo would also turn on the dev-dependencies'
# features (tokio's test-util, whose clock takes a lock on every read) in the binary.
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers

WORK=$(mktemp -d /tmp/switchyard-bench-validate.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT/bench"
TGT="postgres://postgres@127.0.0.1:$TARGET_PORT/bench"

echo "loading $ROWS rows on both servers ..." >&2
psql -q "postgres://postgres@127.0.0.1:$SOURCE_PORT/postgres" -c "CREATE DATABASE bench"
psql -q "postgres://postgres@127.0.0.1:$TARGET_PORT/postgres" -c "CREATE DATABASE bench"
SQL=$(sed "s/{{rows}}/$ROWS/" testdata/bench.sql)
# (Waits name their jobs: a bare `wait` would also wait for the servers.)
psql -q -v ON_ERROR_STOP=1 "$SRC" -c "$SQL" & load_source=$!
psql -q -v ON_ERROR_STOP=1 "$TGT" -c "$SQL" & load_target=$!
wait "$load_source" "$load_target"
# Settled tables for every tool alike: hint bits set and no autovacuum pass over the fresh
# rows competing with the first runs.
psql -q "$SRC" -c "VACUUM (FREEZE, ANALYZE) bench_rows" & vacuum_source=$!
psql -q "$TGT" -c "VACUUM (FREEZE, ANALYZE) bench_rows" & vacuum_target=$!
wait "$vacuum_source" "$vacuum_target"

cat > "$WORK/bench.toml" <<PLAN
name = "bench"
[source]
url = "$SRC"
[target]
url = "$TGT"
[state]
path = "$WORK/state.json"
PLAN

now() { date +%s.%N; }
# seconds <command...>: runs it, prints the wall time
seconds() { local a b; a=$(now); "$@" > /dev/null; b=$(now); python3 -c "print(f'{$b - $a:.2f}')"; }

# Both servers at once, SEGMENTS ranges per server, all in parallel (as data-diff's threads do).
SEGMENTS=$JOBS
both_segmented() {
  local template=$1 step=$(( (ROWS + SEGMENTS - 1) / SEGMENTS )) pids=()
  for url in "$SRC" "$TGT"; do
    for s in $(seq 0 $((SEGMENTS - 1))); do
      psql -qAt "$url" -c "${template//\{range\}/id > $((s * step)) AND id <= $(((s + 1) * step))}" > /dev/null &
      pids+=($!)
    done
  done
  wait "${pids[@]}"
}
DATADIFF="SELECT count(*), sum(('x' || substring(md5(concat(id::text, customer_id::text, status, amount::text, to_char(created_at, 'YYYY-mm-dd HH24:MI:SS.US'), note)), 18))::bit(60)::bigint) FROM bench_rows WHERE {range}"
PGCOPYDB="SELECT count(1), sum(hashtext(t::text)::bigint) FROM bench_rows t WHERE {range}"

validate() { "$ROOT/target/release/switchyard" validate "$WORK/bench.toml" --jobs "$JOBS" --json > "$WORK/$1.json" || true; }

# median_of_3 <function> <name>: the median wall time of three runs
median_of_3() { printf '%s\n' "$(seconds "$@")" "$(seconds "$@")" "$(seconds "$@")" | sort -n | sed -n 2p; }

echo "switchyard validate (clean, three runs) ..." >&2
t_clean=$(median_of_3 validate clean)
echo "data-diff checksum SQL ..." >&2
t_datadiff=$(seconds both_segmented "$DATADIFF")
echo "pgcopydb compare SQL ..." >&2
t_pgcopydb=$(seconds both_segmented "$PGCOPYDB")

psql -q "$TGT" -c "UPDATE bench_rows SET amount = amount + 1 WHERE id IN (SELECT 1 + (k * 48611) % $ROWS FROM generate_series(1, 100) k)"
echo "switchyard validate (100 differences, three runs) ..." >&2
t_diff=$(median_of_3 validate diff)

python3 - "$WORK" "$ROWS" "$t_clean" "$t_datadiff" "$t_pgcopydb" "$t_diff" "$JOBS" <<'PY'
import json, sys
work, rows, clean, datadiff, pgcopydb, diff, jobs = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:7]), sys.argv[7]
c = json.load(open(f"{work}/clean.json")); d = json.load(open(f"{work}/diff.json"))
found = sum(t["changed"] + t["missing"] + t["extra"] for t in d["tables"])
rate = lambda s: rows / s
print(f"\n{rows:,} rows per side, source PostgreSQL 15 and target 17 on one machine, jobs {jobs}\n")
print("| tool | time | rows/s | switchyard's advantage | result |")
print("|---|---|---|---|---|")
print(f"| switchyard validate (median of 3) | {clean:.2f} s | {rate(clean):,.0f} | - | {c['verdict']} |")
print(f"| data-diff checksum SQL | {datadiff:.2f} s | {rate(datadiff):,.0f} | {datadiff / clean:.1f}x | - |")
print(f"| pgcopydb compare SQL | {pgcopydb:.2f} s | {rate(pgcopydb):,.0f} | {pgcopydb / clean:.1f}x | - |")
print(f"| switchyard validate, 100 differences (median of 3) | {diff:.2f} s | {rate(diff):,.0f} | {diff / clean:.2f}x the clean run | {d['verdict']}, {found} found |")
PY
