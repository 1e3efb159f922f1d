#!/usr/bin/env bash
# Installs the tools the test command needs that cargo does not bring, into .tools/ (git-ignored). Idempotent: a
# second run with everything present returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

buf_version=1.75.0
tools=.tools
mkdir -p "$tools"

if [ ! -x "$tools/node_modules/.bin/buf" ] || [ "$("$tools/node_modules/.bin/buf" --version 2>/dev/null)" != "$buf_version" ]; then
  command -v npm >/dev/null || { echo "install-tools: npm is needed to install buf (Debian: apt-get install npm)" >&2; exit 1; }
  echo "install-tools: installing buf $buf_version from npm into $tools" >&2
  npm install --silent --no-audit --no-fund --prefix "$tools" "@bufbuild/buf@$buf_version" >&2
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "install-tools: installing cargo-nextest from crates.io" >&2
  cargo install --locked cargo-nextest >&2
fi
