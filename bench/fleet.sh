#!/usr/bin/env bash
# Fleet registry at scale: DEVICES simulated devices (default 1000; one MQTT connection each,
# telemetry every second, in a separate process) report to one escalator on its embedded broker
# with the device registry on SQLite. Prints how long until all are registered, the fleet API's
# latency under that load (the whole device list, as the console loads it, and the summary), and
# the escalator's memory: idle, and peak with the fleet connected (per device: the difference).
#
#   bench/fleet.sh
#   DEVICES=3000 ESCALATOR=target/release/cloud-escalator bench/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-1000}
HOLD_S=${HOLD_S:-20}
if [ -z "${ESCALATOR:-}" ]; then
  echo "building cloud-escalator (release)" >&2
  cargo build --release --quiet -p cloud-escalator
  ESCALATOR=$PWD/target/release/cloud-escalator
fi
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mqtt=$(free_port)
api=$(free_port)
cat > "$dir/escalator.toml" <<TOML
fleet = "bench"
[broker]
listen = "127.0.0.1:$mqtt"
client_id = "fleet-bench"
[[routes]]
edge_model = "digits-edge"
cloud_model = "$PWD/models/digits-cloud.onnx"
[store]
path = ":memory:"
[management]
store = "$dir/fleet.db"
listen = "127.0.0.1:$api"
max_devices = 100000
TOML
token=$("$ESCALATOR" bootstrap-token --store "$dir/fleet.db" --name bench --role read_only)
RUST_LOG=warn,rumqttd=off "$ESCALATOR" serve --config "$dir/escalator.toml" &
escalator=$!
trap 'kill $escalator 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do (exec 9<>"/dev/tcp/127.0.0.1/$api") 2>/dev/null && break; sleep 0.1; done
sleep 1
idle=$(awk '/VmRSS/ {print $2}' "/proc/$escalator/status")
CASCADE_TOKEN=$token "$ESCALATOR" perf fleet --broker "mqtt://127.0.0.1:$mqtt" --fleet bench \
  --devices "$DEVICES" --api "http://127.0.0.1:$api" --hold-s "$HOLD_S" > "$dir/fleet.json"
peak=$(awk '/VmHWM/ {print $2}' "/proc/$escalator/status")
python3 - "$dir/fleet.json" "$idle" "$peak" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
idle, peak = int(sys.argv[2]), int(sys.argv[3])
print(f"{r['registered']} of {r['devices']} devices registered in {r['register_s']:.1f} s; "
      f"{r['telemetry']} telemetry messages")
print(f"GET /devices (all): p50 {r['list_all']['p50_us']/1e3:.1f} ms, p99 {r['list_all']['p99_us']/1e3:.1f} ms "
      f"({r['list_all']['n']} requests); GET /summary p50 {r['summary']['p50_us']/1e3:.1f} ms")
print(f"escalator RSS idle {idle/1024:.1f} MiB, peak {peak/1024:.1f} MiB: "
      f"{(peak-idle)/r['devices']:.1f} KiB per connected device")
PY
