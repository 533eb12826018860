# Sourced by scripts/demo.sh and bench/*.sh: starts the throwaway PostgreSQL 15 source and
# PostgreSQL 17 target of `examples/servers.rs` and exports their settings (SOURCE_PORT,
# TARGET_PORT, SOURCE_URL, TARGET_URL, PGPASSWORD). They stop when the calling script exits.
#
#   start_servers <profile: debug|release> <work dir>

start_servers() {
  local profile=$1 work=$2
  # The servers live as long as the example's stdin stays open.
  mkfifo "$work/hold"
  "$ROOT/target/$profile/examples/servers" < "$work/hold" > "$work/servers.env" &
  SERVERS_PID=$!
  exec 3> "$work/hold"
  SERVERS_WORK=$work
  trap stop_servers EXIT
  for _ in $(seq 1 600); do
    grep -q TARGET_BIN "$work/servers.env" 2>/dev/null && break
    sleep 0.1
  done
  # shellcheck disable=SC1091
  source "$work/servers.env"
  export PGPASSWORD SOURCE_PORT TARGET_PORT SOURCE_URL TARGET_URL
}

stop_servers() {
  exec 3>&- || true
  wait "$SERVERS_PID" 2>/dev/null || true
  rm -rf "$SERVERS_WORK"
}

# A free 127.0.0.1 port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# pgbench_database <scale>: the database `bench` on the source, initialised by pgbench at that
# scale, and the role `app` (password $APP_PASSWORD) that may read it.
pgbench_database() {
  local src="postgres://postgres@127.0.0.1:$SOURCE_PORT"
  psql -q -v ON_ERROR_STOP=1 "$src/postgres" -c "CREATE DATABASE bench"
  /usr/lib/postgresql/15/bin/pgbench -q -i -s "$1" "$src/bench" >/dev/null 2>&1
  psql -q -v ON_ERROR_STOP=1 "$src/bench" -c "CREATE ROLE app LOGIN PASSWORD '$APP_PASSWORD'; GRANT SELECT ON ALL TABLES IN SCHEMA public TO app"
}
