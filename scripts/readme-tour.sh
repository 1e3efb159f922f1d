#!/usr/bin/env bash
# Runs the README's grpcurl tour (the block between <!-- tour:begin --> and <!-- tour:end -->) exactly as written,
# against a fresh `smartfarm serve` on a free port, so the README's examples cannot rot. The only substitutions are
# the address (127.0.0.1:50051 -> the free port) and the data dir (smartfarm-data -> a temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
binary="$target_dir/debug/smartfarm"
[ -x "$binary" ] || { echo "readme-tour: $binary is missing; run cargo build -p smartfarm first" >&2; exit 1; }
grpcurl_bin="$(./scripts/install-tools.sh --print-grpcurl)"

work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

"$binary" serve --listen 127.0.0.1:0 --data-dir "$work/smartfarm-data" --addr-file "$work/addr" >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  [ -s "$work/addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; echo "readme-tour: the server exited" >&2; exit 1; }
  sleep 0.1
done
addr=$(cat "$work/addr")

tour=$(sed -n '/<!-- tour:begin -->/,/<!-- tour:end -->/p' README.md | sed '/^```/d; /^<!--/d')
[ -n "$tour" ] || { echo "readme-tour: no tour block found in README.md" >&2; exit 1; }
tour=${tour//127.0.0.1:50051/$addr}
tour=${tour//smartfarm-data/$work/smartfarm-data}

mkdir -p "$work/bin"
ln -s "$grpcurl_bin" "$work/bin/grpcurl"
(
  cd "$work"
  export PATH="$work/bin:$PATH"
  set -euo pipefail
  eval "$tour"
) >"$work/tour.out" 2>&1 || { cat "$work/tour.out" >&2; echo "readme-tour: the README tour failed" >&2; exit 1; }

# The tour must have done what it says: a farm with a gateway and a sensor, and a farm-scoped key.
for expected in '"kind": "DEVICE_KIND_GATEWAY"' '"name": "soil probe 1"' '"secret": "sfk_' \
  'smartfarm.device.v1.DeviceService' 'SERVING'; do
  grep -q "$expected" "$work/tour.out" || { cat "$work/tour.out" >&2; echo "readme-tour: missing $expected" >&2; exit 1; }
done
echo "readme-tour: the README's grpcurl tour works as written"
