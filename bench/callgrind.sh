#!/usr/bin/env bash
# The proxy's hot path in instructions per transaction, which the noise of a shared machine
# cannot move: the proxy runs under callgrind while pgbench -S sends a fixed number of
# transactions through it, twice (T1 and T2 per client); the difference of the two runs'
# instruction totals over the difference of their transaction counts leaves out what both
# runs share (start, logins with their SCRAM key derivation, shutdown).
#
#   bench/callgrind.sh                                  # this tree's release build
#   BENCH_BASELINE=/tmp/switchyard-old bench/callgrind.sh   # and another build, in the same run
#   BENCH_CLIENTS=1 BENCH_MODES="simple extended prepared" bench/callgrind.sh
#   BENCH_KEEP=/tmp/cg bench/callgrind.sh   # keeps each run's callgrind.out, for callgrind_annotate
#   BENCH_PROXY_EXTRA=$'[proxy.shadow]\nfraction = 1.0' bench/callgrind.sh   # more of the plan's [proxy]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLIENTS=${BENCH_CLIENTS:-16}
MODES=${BENCH_MODES:-simple extended}
T1=${BENCH_T1:-50}
T2=${BENCH_T2:-300}
POOL=${POOL_SIZE:-10}

scripts/install-deps.sh
command -v valgrind >/dev/null || { echo "installing valgrind" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
cargo build --quiet --release --bin switchyard
cargo build --quiet --release --example servers
PG_BIN=/usr/lib/postgresql/15/bin

WORK=$(mktemp -d /tmp/switchyard-bench-callgrind.XXXXXX)
chmod 755 "$WORK"
# shellcheck source=scripts/lib/servers.sh
source scripts/lib/servers.sh
start_servers release "$WORK"
SRC="postgres://postgres@127.0.0.1:$SOURCE_PORT"
APP_PASSWORD=bench-app-pw
export APP_PASSWORD
pgbench_database 10

# instructions <binary> <mode> <transactions per client>: the proxy's total Ir for one run.
instructions() {
  local bin=$1 mode=$2 per_client=$3 port admin out pid
  port=$(free_port); admin=$(free_port)
  cat > "$WORK/plan.toml" <<PLAN
name = "bench"
[source]
url = "$SRC/bench"
[target]
url = "$SRC/bench"
[proxy]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
pool_mode = "transaction"
pool_size = $POOL
workers = 2
${BENCH_PROXY_EXTRA:-}
[[proxy.users]]
name = "app"
password_env = "APP_PASSWORD"
[state]
path = "$WORK/state.json"
PLAN
  out="$WORK/callgrind.out"
  rm -f "$out"
  # Not counted: SCRAM's key derivation (PBKDF2, 4096 rounds of HMAC-SHA-256, some 20 million
  # instructions a login). The two runs' difference leaves out the logins they share, but the
  # pool may open a server connection more in one run than the other (a client that waited),
  # and one login more moved a 16-client result by up to 10%. (--collect-atstart must come
  # after --toggle-collect, which turns it off.)
  RUST_LOG=warn valgrind --tool=callgrind --toggle-collect='*sasl::hi*' --collect-atstart=yes \
    --callgrind-out-file="$out" "$bin" proxy "$WORK/plan.toml" \
    2> "$WORK/valgrind.log" &
  pid=$!
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  PGPASSWORD=$APP_PASSWORD "$PG_BIN/pgbench" -n -S -M "$mode" -c "$CLIENTS" -j 2 -t "$per_client" \
    "postgres://app@127.0.0.1:$port/bench" > "$WORK/pgbench.log" 2>&1 \
    || { cat "$WORK/pgbench.log" >&2; exit 1; }
  kill -INT "$pid"
  wait "$pid" || true
  if [ -n "${BENCH_KEEP:-}" ]; then
    mkdir -p "$BENCH_KEEP"
    cp "$out" "$BENCH_KEEP/callgrind.$(basename "$(dirname "$bin")")-$(basename "$bin").$mode.$per_client.out"
  fi
  sed -n 's/^summary: *//p; s/^totals: *//p' "$out" | head -n 1
}

echo "pgbench -S, $CLIENTS clients, pool $POOL, 2 workers: proxy instructions per transaction, from runs of $T1 and $T2 transactions per client"
echo
echo "| build | protocol | instructions per transaction |"
echo "|---|---|---|"
builds=("$ROOT/target/release/switchyard")
[ -n "${BENCH_BASELINE:-}" ] && builds+=("$BENCH_BASELINE")
for mode in $MODES; do
  for bin in "${builds[@]}"; do
    a=$(instructions "$bin" "$mode" "$T1")
    b=$(instructions "$bin" "$mode" "$T2")
    per=$(python3 -c "print(f'{($b - $a) / ($CLIENTS * ($T2 - $T1)):,.0f}')")
    label=this; [ "$bin" != "$ROOT/target/release/switchyard" ] && label="baseline"
    echo "| $label | $mode | $per |"
  done
done
