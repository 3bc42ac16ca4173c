#!/usr/bin/env bash
# Two builds of cloud-escalator on the escalation round trip (`perf round-trip`: agent → broker →
# escalator → agent, no-op model, spool flushed), alternating round by round with the paho-mqtt
# ping-pong floor on one private Mosquitto, so that a change is measured against its baseline in
# the same conditions. Prints each round's p50/p99 and its ratio to that round's floor.
#
#   git worktree add /tmp/base HEAD~1 && (cd /tmp/base && cargo build --release -p cloud-escalator)
#   cargo build --release -p cloud-escalator
#   bench/round_trip_ab.sh /tmp/base/target/release/cloud-escalator target/release/cloud-escalator
#
# Peers install into a virtual environment ($PEERS, default /tmp/peers) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=$(realpath "$1"); NEW=$(realpath "$2")
N=${N:-2000}; WARMUP=${WARMUP:-200}; ROUNDS=${ROUNDS:-6}
PEERS=${PEERS:-/tmp/peers}
if [ ! -x "$PEERS/bin/python" ] || ! "$PEERS/bin/python" -c "import paho.mqtt" 2>/dev/null; then
  python3 -m venv "$PEERS"
  "$PEERS/bin/pip" install --quiet paho-mqtt==2.2.0
fi
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n' "$port" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" 2>"$dir/mosquitto.log" &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$dir"' EXIT
sleep 0.5
for round in $(seq "$ROUNDS"); do
  echo "round $round" >&2
  "$PEERS/bin/python" bench/mqtt_ping_pong.py 127.0.0.1 "$port" "$N" "$WARMUP" 121 >> "$dir/peer.jsonl"
  "$BASE" perf round-trip --broker "mqtt://127.0.0.1:$port" --n "$N" --warmup "$WARMUP" >> "$dir/base.jsonl"
  "$NEW" perf round-trip --broker "mqtt://127.0.0.1:$port" --n "$N" --warmup "$WARMUP" >> "$dir/new.jsonl"
done
python3 - "$dir" <<'PY'
import json, pathlib, statistics, sys
d = pathlib.Path(sys.argv[1])
def rows(name): return [json.loads(l)["latency"] for l in (d / name).read_text().splitlines()]
peer = rows("peer.jsonl")
for name in ("peer.jsonl", "base.jsonl", "new.jsonl"):
    r = rows(name)
    line = " ".join(f"{x['p50_us']:.0f}/{x['p99_us']:.0f}" for x in r)
    ratio = " ".join(f"{x['p50_us']/p['p50_us']:.2f}/{x['p99_us']/p['p99_us']:.2f}" for x, p in zip(r, peer))
    over = sum(x["over_40ms"] for x in r)
    med = lambda k: statistics.median(x[k] for x in r)
    print(f"{name.removesuffix('.jsonl'):<5} p50/p99 per round (us): {line}")
    print(f"{'':<5} ratio to the floor: {ratio}; medians {med('p50_us'):.0f}/{med('p99_us'):.0f} us; over 40 ms: {over}")
PY
