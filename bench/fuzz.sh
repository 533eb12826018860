#!/usr/bin/env bash
# Proxy fuzzing, longer than in the test suite: tests/it/proxy_fuzz.rs (seeded random,
# well-formed protocol sessions: eight clients at once directly, through a transaction-mode
# and through a session-mode proxy, checked for cross-client answers, missing or extra
# ReadyForQuery, hangs and committed abandoned transactions; then each session directly and
# through a proxy, compared message by message) for FUZZ_SECS instead of the test's 60 s.
# Prints the seed and the counts; the full report (one example of each distinct failure,
# shrunk where a single session shows it) is in the log it names.
#
#   bench/fuzz.sh                    # 300 s, a random seed
#   FUZZ_SECS=1800 bench/fuzz.sh
#   FUZZ_SEED=1234 bench/fuzz.sh     # the same sessions as the run that printed that seed
#   FUZZ_DIFFERENTIAL=session bench/fuzz.sh   # the differential phase in session mode only
#   SWITCHYARD_FUZZ_SHADOW=1 bench/fuzz.sh    # both proxies capture every read for a shadow replay
#   FUZZ_RELEASE=1 bench/fuzz.sh     # release builds of the proxy and the fuzzer: more
#                                    # sessions per second, a long build (fat LTO)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export SWITCHYARD_FUZZ_SECS=${FUZZ_SECS:-300}
# Both pool modes in the differential phase (the test suite's run compares session mode only).
export SWITCHYARD_FUZZ_DIFFERENTIAL=${FUZZ_DIFFERENTIAL:-session,transaction}
# A new seed each run unless one is given (the test suite's run uses a fixed one).
export SWITCHYARD_FUZZ_SEED=${FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
PROFILE=()
if [ -n "${FUZZ_RELEASE:-}" ]; then PROFILE=(--release); fi
LOG=$(mktemp /tmp/switchyard-fuzz.XXXXXX)

cargo test --quiet "${PROFILE[@]}" --test it --no-run
echo "fuzzing the proxy for ${SWITCHYARD_FUZZ_SECS} s (log: $LOG) ..." >&2
status=0
cargo test "${PROFILE[@]}" --test it proxy_fuzz -- --nocapture >"$LOG" 2>&1 || status=$?

grep -m1 '^proxy_fuzz: seed' "$LOG" || true
if grep -q '^proxy_fuzz summary' "$LOG"; then
  # The counts per phase and in total, then one line per distinct failure.
  sed -n '/^proxy_fuzz summary/,/^  totals:/p' "$LOG"
  grep -E '^  [0-9]+ differences allowed' "$LOG" || true
  grep -E '^== |^  -- ' "$LOG" || true
else
  # It stopped before its report (a build or setup failure): its last words.
  tail -n 40 "$LOG"
fi
echo "full report: $LOG"
exit "$status"
