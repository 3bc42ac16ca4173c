#!/usr/bin/env bash
# OTA delivery: (1) DEVICES simulated devices (default 200) take a model update from one escalator
# over a private Mosquitto: total time, the escalator's peak memory, and MQTT bytes per device
# against the model's size (goal <= 1.05x); (2) the delta for a retrained model against
# `zstd -19 --long --patch-from` of the same pair (goal: ours <= zstd's).
#
#   bench/ota.sh
#   DEVICES=50 MODEL=models/digits-edge.f32.onnx bench/ota.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-200}
MODEL=${MODEL:-models/digits-cloud.onnx}   # 606 KB: ten 64 KiB chunks
BASE=${BASE:-models/digits-edge.f32.onnx}
RETRAINED=${RETRAINED:-models/testdata/digits-edge.unsure.onnx}

# ESCALATOR=path skips the build and uses that binary.
if [ -z "${ESCALATOR:-}" ]; then
  echo "building cloud-escalator (release)" >&2
  cargo build --release --quiet -p cloud-escalator
  ESCALATOR=$PWD/target/release/cloud-escalator
fi
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 10000\n' "$port" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" 2>/dev/null &
broker=$!
trap 'kill $broker ${escalator:-} 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do (exec 9<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

"$ESCALATOR" models keygen --out "$dir/fleet.key" >/dev/null
"$ESCALATOR" models publish --registry "$dir/registry" --model "$MODEL" --name perf-model \
  --version 2.0.0 --key "$dir/fleet.key" --target all >&2
cat > "$dir/escalator.toml" <<TOML
fleet = "perf"
[broker]
url = "mqtt://127.0.0.1:$port"
client_id = "ota-bench"
[[routes]]
edge_model = "digits-edge"
cloud_model = "$PWD/models/digits-cloud.onnx"
[store]
path = ":memory:"
[ota]
registry = "$dir/registry"
TOML
RUST_LOG=warn "$ESCALATOR" serve --config "$dir/escalator.toml" &
escalator=$!
sleep 1
"$ESCALATOR" perf ota --broker "mqtt://127.0.0.1:$port" --fleet perf --devices "$DEVICES" \
  --model perf-model > "$dir/fleet.json"
peak=$(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$escalator/status")
python3 - "$dir/fleet.json" "$peak" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
print(f"{r['updated']} of {r['devices']} devices updated in {r['seconds']:.1f} s; escalator peak RSS {sys.argv[2]}")
print(f"bytes on the wire per device {r['wire_bytes_per_device']:.0f} for a {r['model_bytes']}-byte model: "
      f"{r['wire_ratio']:.3f}x (goal <= 1.05x)")
PY

# Deltas: ours (built by `models publish` against the previous version) and zstd's CLI.
"$ESCALATOR" models publish --registry "$dir/deltas" --model "$BASE" --name delta-model \
  --version 1.0.0 --key "$dir/fleet.key" --target all >/dev/null
"$ESCALATOR" models publish --registry "$dir/deltas" --model "$RETRAINED" --name delta-model \
  --version 1.1.0 --key "$dir/fleet.key" --target all >/dev/null
ours=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["content"]; print(m["delta"]["artifact"]["size"] if m["delta"] else m["full"]["size"])' \
  "$dir/deltas/delta-model/1.1.0/manifest.json")
zstd -q -19 --long=27 --patch-from="$BASE" "$RETRAINED" -o "$dir/zstd.patch"
theirs=$(stat -c %s "$dir/zstd.patch")
echo "delta $BASE -> $RETRAINED ($(stat -c %s "$RETRAINED") bytes): ours $ours bytes, zstd -19 --long --patch-from $theirs bytes, ratio $(python3 -c "print(f'{$ours/$theirs:.2f}')") (goal <= 1.0)"
