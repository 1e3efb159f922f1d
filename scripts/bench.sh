#!/usr/bin/env bash
# Builds release binaries and runs the telemetry, photo, alert, command and AI benchmarks (see tests/src/bin/smartfarm-bench/), printing one JSON
# line per measurement. Needs what the tests need (PostgreSQL, the tools from install-tools.sh) plus the Debian
# `mosquitto` package for the fan-in baseline, and NATS for the command benchmark. Takes about ten minutes once built.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-tools.sh
command -v mosquitto >/dev/null || { echo "bench: the fan-in baseline needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release --locked -p smartfarm -p smartfarm-edge -p smartfarm-e2e --bins
bench="${CARGO_TARGET_DIR:-target}/release/smartfarm-bench"
"$bench" ingest --readings 500000
"$bench" fanin --publishers 50 --messages-per-publisher 2000
"$bench" fanin --publishers 50 --messages-per-publisher 2000 --fsync interval
"$bench" footprint --sensors 1000 --rate 10000 --seconds 20
"$bench" images --photos 100 --cameras 100 --hours 24
"$bench" alerts --probes 10 --events 10000 --publishers 50   # half the end-to-end maximum
"$bench" alerts --probes 10 --events 10000 --publishers 50 --load-nice 19   # the simulated sensors yield the CPU
"$bench" alerts --probes 10 --events 10000 --publishers 50 --maximum agent  # half what the agent alone takes in
"$bench" alerts --probes 10 --events 10000 --publishers 50 --background-share 0
SMARTFARM_BENCH_EDGE_CONFIG=$'upload_interval = "1h"\nupload = "raw"\nupload_threshold_bytes = 100000000000\n' \
  "$bench" alerts --probes 10 --events 10000 --publishers 50 --maximum agent
"$bench" commands --count 1000   # needs NATS with JetStream on 127.0.0.1:4222 (SMARTFARM_TEST_NATS_URL)

# The AI benchmark: Burn against ONNX Runtime on the same network and photos (ONNX Runtime from PyPI, pinned).
ort="$PWD/.tools/ort"
if ! PYTHONPATH="$ort" python3 -c "import onnxruntime" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$ort" \
    "onnxruntime==1.32.0" "numpy==2.4.6" >&2
fi
photos="${SMARTFARM_BENCH_PHOTOS:-services/ml/fixtures/plants}"   # e.g. the PlantVillage folder
PYTHONPATH="$ort" cargo bench --locked -p smartfarm-ml --bench inference -- --photos "$PWD/$photos" --count 32
