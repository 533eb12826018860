#!/usr/bin/env bash
# Shadow reads benchmark: pgbench -S (simple protocol) at 16 clients through three proxies in
# front of the same PostgreSQL 15 source, replaying none, a tenth and every read on the
# PostgreSQL 17 target ([proxy.shadow] fraction 0, 0.1 and 1.0); the three alternate, round
# by round, in one run. Reported: client throughput, the proxy's CPU per transaction
# (user + system time of its process over the transactions it served), and the target
# server's CPU per replay (user + system time of its postmaster's processes, exited ones
# included, over the replays of the round).
#
# Both servers, the proxies and pgbench share this machine's cores, so the replays' own cost
# (on the target, and in the proxy) is in the figures.
#
# Floor (issue 26): at 0.1 the client throughput >= 0.9x that at fraction 0.
#
#   bench/shadow.sh                           # 3 rounds of 5 s per cell
#   BENCH_SECONDS=10 BENCH_ROUNDS=5 bench/shadow.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
SCALE=${BENCH_SCALE:-10}
CLIENTS=16

scripts/install-deps.sh
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
PG_BIN=/usr/lib/postgresql/15/bin

WORK=$(mktemp -d /tmp/switchyard-bench-shadow.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; stop_servers' EXIT
APP_PASSWORD=bench-app-pw
export APP_PASSWORD

echo "pgbench scale $SCALE on both servers ..." >&2
pgbench_database "$SCALE"
TGT="postgres://postgres@127.0.0.1:$TARGET_PORT"
psql -q -v ON_ERROR_STOP=1 "$TGT/postgres" -c "CREATE DATABASE bench"
# PostgreSQL 15's pgbench initialises the 17 target too (the 17 here is a server build without client tools).
"$PG_BIN/pgbench" -q -i -s "$SCALE" "$TGT/bench" >/dev/null 2>&1
psql -q -v ON_ERROR_STOP=1 "$TGT/bench" -c "CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD'; GRANT SELECT ON ALL TABLES IN SCHEMA public TO app"

FRACTIONS=(0 0.1 1.0)
declare -A PORT ADMIN PID
for f in "${FRACTIONS[@]}"; do
  PORT[$f]=$(free_port); ADMIN[$f]=$(free_port)
  cat > "$WORK/plan-$f.toml" <<PLAN
name = "bench_shadow"
[source]
url = "postgres://postgres@127.0.0.1:$SOURCE_PORT/bench"
[target]
url = "postgres://postgres@127.0.0.1:$TARGET_PORT/bench"
[proxy]
listen = "127.0.0.1:${PORT[$f]}"
admin_listen = "127.0.0.1:${ADMIN[$f]}"
pool_mode = "transaction"
pool_size = 10
[proxy.shadow]
fraction = $f
max_in_flight = 8
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/state-$f.json"
PLAN
  RUST_LOG=warn "$ROOT/target/release/switchyard" proxy "$WORK/plan-$f.toml" 2> "$WORK/proxy-$f.log" &
  PID[$f]=$!
  PIDS+=("${PID[$f]}")
done
for f in "${FRACTIONS[@]}"; do
  for _ in $(seq 1 100); do
    curl -sf "127.0.0.1:${ADMIN[$f]}/status" >/dev/null && break
    sleep 0.1
  done
done

# cpu_ticks <pid>: user + system clock ticks of a process.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
# server_ticks <port>: user + system clock ticks of a server's postmaster, its live children
# and its exited ones (the postmaster's cutime/cstime).
server_ticks() {
  local pm
  pm=$(pgrep -f "port=$1" | head -1)
  { awk '{print $16 + $17}' "/proc/$pm/stat"
    for p in $pm $(pgrep -P "$pm"); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done
  } | awk '{s += $1} END {print s}'
}
# replays <fraction>: the proxy's replays so far.
replays() {
  curl -s "127.0.0.1:${ADMIN[$1]}/metrics" | awk '/^switchyard_shadow_samples_total/ {print $2; found=1} END {if (!found) print 0}'
}

# run <fraction>: "tps cpu_us_per_transaction target_cpu_us_per_replay"
run() {
  local url="postgres://app:$APP_PASSWORD@127.0.0.1:${PORT[$1]}/bench"
  local before after out tps
  local t0 t1 r0 r1
  before=$(cpu_ticks "${PID[$1]}"); t0=$(server_ticks "$TARGET_PORT"); r0=$(replays "$1")
  out=$("$PG_BIN/pgbench" -n -S -M simple -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" "$url" 2>&1) || { echo "$out" >&2; return 1; }
  after=$(cpu_ticks "${PID[$1]}"); t1=$(server_ticks "$TARGET_PORT"); r1=$(replays "$1")
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  awk -v t="$tps" -v s="$SECONDS_PER_RUN" -v d="$((after - before))" -v hz="$TICK" \
    -v td="$((t1 - t0))" -v r="$((r1 - r0))" \
    'BEGIN { printf "%s %.1f %s\n", t, d / hz * 1e6 / (t * s), (r > 0 ? sprintf("%.0f", td / hz * 1e6 / r) : "-") }'
}

declare -A TPS CPU TARGET
for round in $(seq 1 "$ROUNDS"); do
  for f in "${FRACTIONS[@]}"; do
    read -r tps cpu target < <(run "$f")
    TPS[$f]="${TPS[$f]:-} $tps"
    CPU[$f]="${CPU[$f]:-} $cpu"
    [ "$target" != - ] && TARGET[$f]="${TARGET[$f]:-} $target"
    echo "round $round, fraction $f: $tps tps, proxy CPU $cpu us/transaction, target CPU $target us/replay" >&2
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {printf "%s-%s", lo, hi}'; }
echo
echo "Shadow reads, pgbench -S at $CLIENTS clients, $(nproc) cores, $ROUNDS rounds of ${SECONDS_PER_RUN}s (median, spread):"
printf '%-9s %10s %22s %8s %12s %12s %16s %s\n' fraction tps "(spread)" "vs 0" "proxy us/tx" "(spread)" "target us/replay" "(spread)"
base=$(echo "${TPS[0]}" | median)
for f in "${FRACTIONS[@]}"; do
  m=$(echo "${TPS[$f]}" | median)
  printf '%-9s %10s %22s %8s %12s %12s %16s %s\n' "$f" "$m" "$(echo "${TPS[$f]}" | spread)" \
    "$(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.3f", a / b }')" \
    "$(echo "${CPU[$f]}" | median)" "$(echo "${CPU[$f]}" | spread)" \
    "$(echo "${TARGET[$f]:-}" | median)" "$(echo "${TARGET[$f]:-}" | spread)"
done
for f in 0.1 1.0; do
  curl -s "127.0.0.1:${ADMIN[$f]}/shadow" | python3 -c "
import json, sys
r = json.load(sys.stdin)
w = r['window']
print(f'fraction $f: {w[\"samples\"]} replayed, {w[\"dropped\"]} dropped, {w[\"divergences\"]} divergent, verdict {r[\"verdict\"]}')
top = max(r['fingerprints'], key=lambda f: f['calls'], default=None)
if top:
    l = top['latency']
    print(f'  {top[\"query\"][:60]}: {top[\"calls\"]} calls, p50 {l[\"old\"][\"p50\"]} / {l[\"new\"][\"p50\"]} ms, p95 {l[\"old\"][\"p95\"]} / {l[\"new\"][\"p95\"]} ms (old / new)')"
done
m=$(echo "${TPS[0.1]}" | median)
awk -v a="$m" -v b="$base" 'BEGIN { printf "fraction 0.1: %.3f x the throughput at 0 (floor: >= 0.9) %s\n", a / b, (a / b >= 0.9 ? "met" : "NOT MET") }'
