#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints, then runs every
# unit and integration test against throwaway PostgreSQL 15 and 17 servers it starts itself.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked --no-run
cargo test --all-targets --locked
