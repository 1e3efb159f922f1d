#!/usr/bin/env bash
# The test command: what the README tells a fresh machine to run, and what CI (.ci/run) runs.
# Contract checks (buf lint, buf breaking against main), formatting, clippy with warnings as errors, then every
# test of the workspace. Tests that need PostgreSQL use SMARTFARM_TEST_DATABASE_URL
# (default postgres://postgres@127.0.0.1:5432/postgres) and fail with the command to start it when it is down.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

./scripts/install-tools.sh
buf=.tools/node_modules/.bin/buf

echo "== buf lint"
"$buf" lint

echo "== buf breaking (against main)"
# What landed (origin/main in a developer's clone), else the local main branch (CI's fresh clone). A missing base is
# an error, not a silent pass.
base=""
for candidate in origin/main main; do
  if git rev-parse --verify -q "$candidate^{commit}" >/dev/null; then base=$candidate; break; fi
done
if [ -z "$base" ]; then
  echo "buf breaking: no main or origin/main branch to compare the contracts against" >&2
  exit 1
elif git cat-file -e "$base:proto/smartfarm" 2>/dev/null; then
  "$buf" breaking --against ".git#ref=$(git rev-parse "$base")"
else
  echo "$base has no contracts yet: nothing to compare against"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo build (the binaries the end-to-end tests start)"
cargo build --workspace --bins --locked

echo "== cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast

echo "== README tour (grpcurl against a fresh server)"
./scripts/readme-tour.sh

echo "== all checks passed in $(( $(date +%s) - started )) s"
