#!/usr/bin/env bash
# Runs the README's tour (the block between <!-- tour:begin --> and <!-- tour:end -->) exactly as written, against a
# fresh `smartfarm demo` (the README's run command) on free ports, so the README's examples cannot rot. The only
# substitutions are the addresses (127.0.0.1:50051 and 127.0.0.1:11883 -> the free ports) and the data dir
# (smartfarm-data -> a temporary one).
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

"$binary" demo --data-dir "$work/smartfarm-data" --listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --upload-interval 1s \
  --addr-file "$work/addr" >"$work/demo.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
  [ -s "$work/addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/demo.log" >&2; echo "readme-tour: the demo exited" >&2; exit 1; }
  sleep 0.1
done
addr=$(jq -r .cloud "$work/addr")
mqtt=$(jq -r .mqtt "$work/addr")
# The tour starts once the demo's first readings are in the cloud.
key=$(cat "$work/smartfarm-data/admin-key")
farm=$(jq -r .farm_id "$work/smartfarm-data/demo.json")
for _ in $(seq 1 150); do
  "$grpcurl_bin" -plaintext -H "authorization: Bearer $key" -d "{\"farm_id\": \"$farm\"}" "$addr" \
    smartfarm.ingestion.v1.TelemetryService/GetLatestReadings 2>/dev/null | grep -q soil_moisture && break
  sleep 0.2
done

# ... and the demo camera's three photos.
for _ in $(seq 1 150); do
  count=$("$grpcurl_bin" -plaintext -H "authorization: Bearer $key" -d "{\"farm_id\": \"$farm\"}" "$addr" \
    smartfarm.image.v1.ImageService/ListImages 2>/dev/null | jq '.images | length' 2>/dev/null || echo 0)
  [ "${count:-0}" -ge 3 ] && break
  sleep 0.2
done

tour=$(sed -n '/<!-- tour:begin -->/,/<!-- tour:end -->/p' README.md | sed '/^```/d; /^<!--/d')
[ -n "$tour" ] || { echo "readme-tour: no tour block found in README.md" >&2; exit 1; }
tour=${tour//127.0.0.1:50051/$addr}
tour=${tour//127.0.0.1:11883/$mqtt}
tour=${tour//-p 11883/-p ${mqtt##*:}}
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
  'smartfarm.device.v1.DeviceService' 'SERVING' '"metric": "soil_moisture"' '"buckets"' '"nextPageToken"' \
  '"metric": "temperature"' '"contentType": "image/jpeg"' '/v1/images/' '"value": 45.5' \
  '"ALERT_ORIGIN_EDGE"' '"name": "calibrate"'; do
  grep -q "$expected" "$work/tour.out" || { cat "$work/tour.out" >&2; echo "readme-tour: missing $expected" >&2; exit 1; }
done
echo "readme-tour: the README's grpcurl tour works as written"
