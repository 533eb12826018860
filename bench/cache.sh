#!/usr/bin/env bash
# Read cache benchmark: a three-table join with an aggregate (customers, orders, order items)
# that takes a few milliseconds on PostgreSQL 15, run by pgbench (-M simple) at 1 and 16
# clients directly, through switchyard without a cache, and through switchyard with
# [proxy.cache] where every read is a hit; the three alternate, round by round, in one run.
# Then a 90/10 read/write mix through the cache, with its hit ratio.
#
# Floors (issue 24): a hit's p50 latency <= 1/3 of the direct query's at 1 client, and hit
# throughput >= 2x direct at 16 clients.
#
#   bench/cache.sh                           # 3 rounds of 5 s per cell
#   BENCH_SECONDS=10 BENCH_ROUNDS=5 bench/cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
POOL=${POOL_SIZE:-10}
CUSTOMERS=${BENCH_CUSTOMERS:-20000}

scripts/install-deps.sh
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
PG_BIN=/usr/lib/postgresql/15/bin

WORK=$(mktemp -d /tmp/switchyard-bench-cache.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
SY_PID=""; PLAIN_PID=""; REDIS_PID=""
trap 'kill $SY_PID $PLAIN_PID $REDIS_PID 2>/dev/null || true; stop_servers' EXIT
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT"
APP_PASSWORD=bench-app-pw
CACHE_PASSWORD=bench-cache-pw
export APP_PASSWORD CACHE_PASSWORD

echo "loading $CUSTOMERS customers, 10 orders each, 3 items per order ..." >&2
psql -q -v ON_ERROR_STOP=1 "$SRC/postgres" -c "CREATE DATABASE shop"
psql -q -v ON_ERROR_STOP=1 "$SRC/shop" <<SQL
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, region text NOT NULL);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers, created date NOT NULL);
CREATE TABLE order_items (order_id int NOT NULL REFERENCES orders, line int NOT NULL,
                          product text NOT NULL, qty int NOT NULL, price numeric(10, 2) NOT NULL,
                          PRIMARY KEY (order_id, line));
INSERT INTO customers SELECT g, 'customer ' || g, 'region ' || (g % 12) FROM generate_series(1, $CUSTOMERS) g;
INSERT INTO orders SELECT g, 1 + (g - 1) / 10, date '2026-01-01' + (g % 300) FROM generate_series(1, $CUSTOMERS * 10) g;
INSERT INTO order_items SELECT o, l, 'product ' || ((o * 7 + l) % 500), 1 + (o + l) % 5, 1 + ((o * 13 + l) % 9000) / 100.0
  FROM generate_series(1, $CUSTOMERS * 10) o, generate_series(1, 3) l;
CREATE INDEX ON orders (customer_id);
VACUUM ANALYZE;
CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD';
GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA public TO app;
ALTER ROLE app SET synchronous_commit = on;
SQL

# The query: a region breakdown of 300 customers' orders (about 9,000 item rows joined).
QUERY="SELECT c.region, count(DISTINCT o.id) AS orders, sum(i.qty * i.price) AS revenue FROM customers c JOIN orders o ON o.customer_id = c.id JOIN order_items i ON i.order_id = o.id WHERE c.id BETWEEN :lo AND :lo + 299 GROUP BY c.region ORDER BY c.region"
# Every read the same statement: all hits once the first has filled the cache.
printf '\\set lo 1001\n%s;\n' "$QUERY" > "$WORK/read.sql"
# 90/10: reads over 20 customer ranges, writes to one order's date.
cat > "$WORK/mix.sql" <<MIX
\\set r random(1, 10)
\\set lo 1 + 300 * random(0, 19)
\\set order random(1, $CUSTOMERS * 10)
\\if :r <= 9
$QUERY;
\\else
UPDATE orders SET created = created + 1 WHERE id = :order;
\\endif
MIX

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no > "$WORK/redis.log" 2>&1 &
REDIS_PID=$!
SY_PORT=$(free_port); SY_ADMIN=$(free_port); PLAIN_PORT=$(free_port); PLAIN_ADMIN=$(free_port)
plan() { # plan <file> <port> <admin port> <cache section or empty>
  cat > "$1" <<PLAN
name = "bench_cache"
[source]
url = "$SRC/shop"
[target]
url = "$SRC/shop"
[proxy]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
pool_mode = "transaction"
pool_size = $POOL
$4
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/state-$2.json"
PLAN
}
plan "$WORK/cached.toml" "$SY_PORT" "$SY_ADMIN" "[proxy.cache]
redis_url = \"redis://127.0.0.1:$REDIS_PORT/\"
replication_user = \"cache_bench\"
replication_password_env = \"CACHE_PASSWORD\"
redis_timeout = \"20ms\""
plan "$WORK/plain.toml" "$PLAIN_PORT" "$PLAIN_ADMIN" ""
"$ROOT/target/release/switchyard" cache setup "$WORK/cached.toml" >&2
RUST_LOG=warn "$ROOT/target/release/switchyard" proxy "$WORK/cached.toml" 2> "$WORK/cached.log" &
SY_PID=$!
RUST_LOG=warn "$ROOT/target/release/switchyard" proxy "$WORK/plain.toml" 2> "$WORK/plain.log" &
PLAIN_PID=$!
for _ in $(seq 1 100); do
  curl -sf "127.0.0.1:$SY_ADMIN/cache" | grep -q '"consuming' && break
  sleep 0.1
done

DIRECT="postgres://app:$APP_PASSWORD@127.0.0.1:$SOURCE_PORT/shop"
PLAIN="postgres://app:$APP_PASSWORD@127.0.0.1:$PLAIN_PORT/shop"
CACHED="postgres://app:$APP_PASSWORD@127.0.0.1:$SY_PORT/shop"
# Warm: the first reads are decided, then filled.
(cd "$WORK" && "$PG_BIN/pgbench" -n -M simple -f "$WORK/read.sql" -c 1 -T 2 "$CACHED" >/dev/null 2>&1)

# run <url> <clients> <script> <label>: "tps p50_ms"
run() {
  local dir="$WORK/log-$4-$2"
  rm -rf "$dir"; mkdir -p "$dir"
  local out
  out=$(cd "$dir" && "$PG_BIN/pgbench" -n -M simple -f "$3" -c "$2" -j "$2" -T "$SECONDS_PER_RUN" -l "$1" 2>&1) || { echo "$out" >&2; return 1; }
  local tps
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  local p50
  p50=$(cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]/1000}')
  echo "$tps $p50"
}

declare -A TPS P50
for clients in 1 16; do
  for round in $(seq 1 "$ROUNDS"); do
    for side in direct plain cached; do
      case $side in direct) url=$DIRECT ;; plain) url=$PLAIN ;; cached) url=$CACHED ;; esac
      read -r tps p50 < <(run "$url" "$clients" "$WORK/read.sql" "$side")
      TPS[$side,$clients]="${TPS[$side,$clients]:-} $tps"
      P50[$side,$clients]="${P50[$side,$clients]:-} $p50"
      echo "round $round, $clients clients, $side: $tps tps, p50 $p50 ms" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%s-%s", lo, hi}'; }
echo
echo "Read cache, $(nproc) cores, $ROUNDS rounds of ${SECONDS_PER_RUN}s (median, spread):"
printf '%-8s %-10s %14s %22s %16s %22s\n' clients path tps "(spread)" "p50 ms" "(spread)"
for clients in 1 16; do
  for side in direct plain cached; do
    printf '%-8s %-10s %14s %22s %16s %22s\n' "$clients" "$side" \
      "$(echo "${TPS[$side,$clients]}" | median)" "$(echo "${TPS[$side,$clients]}" | spread)" \
      "$(echo "${P50[$side,$clients]}" | median)" "$(echo "${P50[$side,$clients]}" | spread)"
  done
done
d1=$(echo "${P50[direct,1]}" | median); c1=$(echo "${P50[cached,1]}" | median)
d16=$(echo "${TPS[direct,16]}" | median); c16=$(echo "${TPS[cached,16]}" | median)
echo
awk -v d="$d1" -v c="$c1" 'BEGIN { printf "1 client: hit p50 / direct p50 = %.3f (floor: <= 0.333) %s\n", c / d, (c / d <= 1/3 ? "met" : "NOT MET") }'
awk -v d="$d16" -v c="$c16" 'BEGIN { printf "16 clients: hit tps / direct tps = %.2f (floor: >= 2) %s\n", c / d, (c / d >= 2 ? "met" : "NOT MET") }'

before=$(curl -s "127.0.0.1:$SY_ADMIN/cache")
read -r mtps mp50 < <(run "$CACHED" 16 "$WORK/mix.sql" mix)
after=$(curl -s "127.0.0.1:$SY_ADMIN/cache")
python3 - "$before" "$after" "$mtps" "$mp50" <<'PY'
import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
hits = a["hits"] - b["hits"]
misses = a["misses"] - b["misses"]
bypassed = sum(a["bypassed"].values()) - sum(b["bypassed"].values())
reads = hits + misses + bypassed
print(f"90/10 mix, 16 clients: {sys.argv[3]} tps, p50 {sys.argv[4]} ms; reads from the cache: {hits}/{reads} ({100 * hits / max(reads, 1):.1f}%)")
PY
