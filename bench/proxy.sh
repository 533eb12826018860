#!/usr/bin/env bash
# Proxy benchmark: pgbench -S (select-only) with -M simple, extended and prepared at 1, 16 and
# 64 clients, directly against PostgreSQL 15, through switchyard and through PgBouncer
# (Debian's package, transaction pooling, the same pool size), in one run. Prints TPS, average
# latency, each proxy's ratio, and each proxy's CPU time per transaction (from its process's
# CPU counters over the run: what matters when the proxy shares cores with the database).
#
#   bench/proxy.sh                      # 5 alternating runs of 5 s per cell
#   BENCH_SECONDS=20 POOL_SIZE=10 bench/proxy.sh
#   BENCH_CLIENTS="1 16" BENCH_MODES=extended bench/proxy.sh   # some cells only
#   BENCH_HOLD=/tmp/bench.env bench/proxy.sh   # start everything, write the URLs, wait until the file is removed
#   BENCH_BASELINE=/tmp/switchyard-old bench/proxy.sh   # also another build of switchyard, side by side
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-5}
POOL=${POOL_SIZE:-10}
SCALE=${BENCH_SCALE:-10}

scripts/install-deps.sh
command -v pgbouncer >/dev/null || { echo "installing pgbouncer" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
# Two builds: with the example in the same one, cargo would also turn on the dev-dependencies'
# features (tokio's test-util, whose clock takes a lock on every read) in the binary.
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
PG_BIN=/usr/lib/postgresql/15/bin

WORK=$(mktemp -d /tmp/switchyard-bench-proxy.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
SY_PID=""; PGB_PID=""; BASE_PID=""
trap 'kill $SY_PID $PGB_PID $BASE_PID 2>/dev/null || true; stop_servers' EXIT
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT"

echo "pgbench -i -s $SCALE ..." >&2
APP_PASSWORD=bench-app-pw
pgbench_database "$SCALE"
VERIFIER=$(psql -At "$SRC/bench" -c "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
SY_PORT=$(free_port); SY_ADMIN=$(free_port); PGB_PORT=$(free_port)
BASE_PORT=$(free_port); BASE_ADMIN=$(free_port)

cat > "$WORK/bench.toml" <<PLAN
name = "bench"
[source]
url = "$SRC/bench"
[target]
url = "$SRC/bench"
[proxy]
listen = "127.0.0.1:$SY_PORT"
admin_listen = "127.0.0.1:$SY_ADMIN"
pool_mode = "transaction"
pool_size = $POOL
workers = ${PROXY_WORKERS:-0}
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/state.json"
PLAN
# Both proxies, the servers and pgbench run in this script's session, so Linux's scheduler
# autogroup (sched_autogroup_enabled) weighs them alike. A proxy started in a session of its own
# (setsid, or a systemd unit's cgroup) gets a core's share of its own: in paired runs at 16
# clients that cut switchyard's CPU per transaction by about 3 µs and its epoll waits by half,
# which would flatter either proxy.
APP_PASSWORD=$APP_PASSWORD RUST_LOG=warn "$ROOT/target/release/switchyard" proxy "$WORK/bench.toml" 2> "$WORK/switchyard.log" &
SY_PID=$!
# Another build of switchyard (an earlier commit's), from the same plan on ports of its own: a
# change to the hot path is judged against it in the same run, round by round.
if [ -n "${BENCH_BASELINE:-}" ]; then
  sed -e "s/127.0.0.1:$SY_PORT/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$SY_ADMIN/127.0.0.1:$BASE_ADMIN/" \
    -e "s#$WORK/state.json#$WORK/state-baseline.json#" "$WORK/bench.toml" > "$WORK/baseline.toml"
  APP_PASSWORD=$APP_PASSWORD RUST_LOG=warn "$BENCH_BASELINE" proxy "$WORK/baseline.toml" 2> "$WORK/baseline.log" &
  BASE_PID=$!
fi

cat > "$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$SOURCE_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 1000
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo "\"app\" \"$VERIFIER\"" > "$WORK/userlist.txt"
chown -R postgres "$WORK" 2>/dev/null || true
if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- pgbouncer -q "$WORK/pgbouncer.ini" & else pgbouncer -q "$WORK/pgbouncer.ini" & fi
PGB_PID=$!
sleep 1
PGB_PID=$(cat "$WORK/pgbouncer.pid" 2>/dev/null || echo "$PGB_PID")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# run <url> <mode> <clients> <pid or ->: prints "tps latency_ms cpu_us_per_txn" or "n/a"
run() {
  local url=$1 mode=$2 clients=$3 pid=$4 before=0 after=0 out
  [ "$pid" != "-" ] && before=$(cpu_ticks "$pid")
  if ! out=$(PGPASSWORD=$APP_PASSWORD "$PG_BIN/pgbench" -n -S -M "$mode" -c "$clients" -j 2 -T "$SECONDS_PER_RUN" "$url" 2>&1) \
     || ! grep -q "number of failed transactions: 0" <<<"$out"; then
    echo "n/a"; return
  fi
  [ "$pid" != "-" ] && after=$(cpu_ticks "$pid")
  local tps latency txns
  tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out")
  latency=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
  txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  python3 -c "
tps, lat, txns, ticks = $tps, $latency, $txns, $after - $before
cpu = '-' if '$pid' == '-' else f'{ticks / $TICK / max(txns, 1) * 1e6:.1f}'
print(f'{tps:.0f} {lat:.3f} {cpu}')"
}

DIRECT="postgres://app@127.0.0.1:$SOURCE_PORT/bench"
SY="postgres://app@127.0.0.1:$SY_PORT/bench"
PGB="postgres://app@127.0.0.1:$PGB_PORT/bench"
BASE="postgres://app@127.0.0.1:$BASE_PORT/bench"

# paired "<runs a>" "<runs b>": the median of the rounds' a/b TPS ratios and their range, as
# "1.02x (0.95-1.10)": each round runs both targets back to back, so a slow moment of the
# machine weighs on both sides of a ratio; "-" when either side has no runs
paired() {
  case "$1$2" in *n/a*) echo -; return ;; esac
  if [ -z "$1" ] || [ -z "$2" ]; then echo -; return; fi
  python3 -c "
import statistics
a = [float(r.split()[0]) for r in '$1'.split(';') if r]
b = [float(r.split()[0]) for r in '$2'.split(';') if r]
r = sorted(x / y for x, y in zip(a, b))
print(f'{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})')"
}

# ratio <a> <b>: a/b as "1.23x", or "-" when either is missing
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then python3 -c "print(f'{$1 / $2:.2f}x')" 2>/dev/null || echo -; else echo -; fi; }

if [ -n "${BENCH_HOLD:-}" ]; then
  # Keep everything running for manual runs (perf, strace): the URLs go to $BENCH_HOLD.
  printf 'DIRECT=%s\nSY=%s\nPGB=%s\nSY_PID=%s\nPGB_PID=%s\nPGPASSWORD=%s\n' "$DIRECT" "$SY" "$PGB" "$SY_PID" "$PGB_PID" "$APP_PASSWORD" > "$BENCH_HOLD"
  while [ -e "$BENCH_HOLD" ]; do sleep 1; done
  exit 0
fi

# mean "<tps lat cpu>;<tps lat cpu>;...": the mean of each column; "n/a" if any run failed
mean() {
  case "$1" in *n/a*|"") echo n/a; return ;; esac
  python3 -c "
rows = [r.split() for r in '$1'.split(';') if r]
avg = lambda i: sum(float(r[i]) for r in rows) / len(rows)
cpu = '-' if rows[0][2] == '-' else f'{avg(2):.1f}'
print(f'{avg(0):.0f} {avg(1):.3f} {cpu}')"
}

printf '\npgbench -S, %s s per run, mean of %s alternating runs per cell, pool size %s, scale %s, %s cores; TPS (avg latency ms) [proxy CPU µs per transaction]\n\n' "$SECONDS_PER_RUN" "$ROUNDS" "$POOL" "$SCALE" "$(nproc)"
printf '| clients | protocol | direct | switchyard | PgBouncer 1.18 | switchyard/direct | PgBouncer/direct | switchyard/PgBouncer | same, median of rounds (range) |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
baseline_rows=""
for clients in ${BENCH_CLIENTS:-1 16 64}; do
  for mode in ${BENCH_MODES:-simple extended prepared}; do
    # The three targets take turns, round by round, so that a slow moment of a shared
    # machine falls on all of them alike.
    d_runs=""; s_runs=""; p_runs=""; b_runs=""
    for _ in $(seq 1 "$ROUNDS"); do
      d_runs+="$(run "$DIRECT" "$mode" "$clients" -);"
      s_runs+="$(run "$SY" "$mode" "$clients" "$SY_PID");"
      [ "$mode" = prepared ] || p_runs+="$(run "$PGB" "$mode" "$clients" "$PGB_PID");"
      [ -z "$BASE_PID" ] || b_runs+="$(run "$BASE" "$mode" "$clients" "$BASE_PID");"
    done
    read -r d_tps d_lat _ <<<"$(mean "$d_runs")"
    read -r s_tps s_lat s_cpu <<<"$(mean "$s_runs")"
    if [ "$mode" = prepared ]; then
      p_cell="n/a: no prepared statements in transaction mode before 1.21"; p_tps=""
    else
      read -r p_tps p_lat p_cpu <<<"$(mean "$p_runs")"
      p_cell="$p_tps ($p_lat) [$p_cpu]"
    fi
    sy_direct=$(ratio "$s_tps" "$d_tps"); pgb_direct=$(ratio "$p_tps" "$d_tps"); sy_pgb=$(ratio "$s_tps" "$p_tps")
    sy_pgb_rounds=$(paired "$s_runs" "$p_runs")
    printf '| %s | %s | %s (%s) | %s (%s) [%s] | %s | %s | %s | %s | %s |\n' "$clients" "$mode" "$d_tps" "$d_lat" "$s_tps" "$s_lat" "$s_cpu" "$p_cell" \
      "$sy_direct" "$pgb_direct" "$sy_pgb" "$sy_pgb_rounds"
    if [ -n "$BASE_PID" ]; then
      read -r b_tps b_lat b_cpu <<<"$(mean "$b_runs")"
      baseline_rows+="| $clients | $mode | $s_tps ($s_lat) [$s_cpu] | $b_tps ($b_lat) [$b_cpu] | $(ratio "$s_tps" "$b_tps") | $(paired "$s_runs" "$b_runs") |"$'\n'
    fi
  done
done
if [ -n "$BASE_PID" ]; then
  printf '\nswitchyard against the baseline build (%s), the same rounds\n\n' "$BENCH_BASELINE"
  printf '| clients | protocol | switchyard | baseline | switchyard/baseline | same, median of rounds (range) |\n|---|---|---|---|---|---|\n%s' "$baseline_rows"
fi
