#!/usr/bin/env bash
# Escalation round trip (agent → broker → escalator → agent, no-op model) against the floor of
# MQTT request/response on the same broker: a paho-mqtt ping-pong with QoS 1 both ways. Both run
# in this one script on a private Mosquitto (set_tcp_nodelay true), alternating, and the ratio
# ours / floor is printed for p50 and p99. Cascade's figure is measured twice: with the agent's
# spool flushed to disk on every escalation (the device default) and without. Here agent and
# escalator share one disk, so the agent's flushes also wait for the escalator's store writes
# (ext4 commits its journal per filesystem); deployed, they run on different machines. The
# default is measured a second time with the escalator's store on /dev/shm, as apart.
#
#   bench/round_trip.sh            # N=2000 round trips each
#   N=500 bench/round_trip.sh
#
# Peers install into a virtual environment ($PEERS, default /tmp/peers) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
WARMUP=${WARMUP:-200}
PEERS=${PEERS:-/tmp/peers}

if [ ! -x "$PEERS/bin/python" ] || ! "$PEERS/bin/python" -c "import paho.mqtt" 2>/dev/null; then
  echo "installing paho-mqtt into $PEERS" >&2
  python3 -m venv "$PEERS"
  "$PEERS/bin/pip" install --quiet paho-mqtt==2.2.0
fi

echo "building cloud-escalator (release)" >&2
cargo build --release --quiet -p cloud-escalator
ESCALATOR=target/release/cloud-escalator

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$dir/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
CONF
mosquitto -c "$dir/mosquitto.conf" 2>"$dir/mosquitto.log" &
broker=$!
trap 'kill $broker 2>/dev/null; rm -rf "$dir"' EXIT
sleep 0.5

for round in 1 2; do
  echo "round $round: paho ping-pong" >&2
  "$PEERS/bin/python" bench/mqtt_ping_pong.py 127.0.0.1 "$port" "$N" "$WARMUP" 121 >> "$dir/peer.jsonl"
  echo "round $round: cascade (fsync)" >&2
  "$ESCALATOR" perf round-trip --broker "mqtt://127.0.0.1:$port" --n "$N" --warmup "$WARMUP" >> "$dir/fsync.jsonl"
  if [ -d /dev/shm ]; then
    echo "round $round: cascade (fsync, escalator store on /dev/shm)" >&2
    "$ESCALATOR" perf round-trip --broker "mqtt://127.0.0.1:$port" --n "$N" --warmup "$WARMUP" --escalator-store /dev/shm >> "$dir/fsync-apart.jsonl"
  fi
  echo "round $round: cascade (no fsync)" >&2
  "$ESCALATOR" perf round-trip --broker "mqtt://127.0.0.1:$port" --n "$N" --warmup "$WARMUP" --no-fsync >> "$dir/nofsync.jsonl"
done

python3 - "$dir" <<'PY'
import json, pathlib, statistics, sys
d = pathlib.Path(sys.argv[1])
def load(name):
    runs = [json.loads(l) for l in (d / name).read_text().splitlines()]
    # The median of each percentile over the rounds.
    pick = lambda key: statistics.median(r["latency"][key] for r in runs)
    return {k: pick(k) for k in ("p50_us", "p99_us", "max_us")} | {"over_40ms": sum(r["latency"]["over_40ms"] for r in runs)}
peer = load("peer.jsonl")
print(f"{'system':<36} {'p50':>9} {'p99':>9} {'max':>9} {'>40ms':>6} {'p50 ratio':>10} {'p99 ratio':>10}")
print(f"{'paho-mqtt ping-pong (floor)':<36} {peer['p50_us']:>7.0f}us {peer['p99_us']:>7.0f}us {peer['max_us']:>7.0f}us {peer['over_40ms']:>6}")
for name, label in (("fsync.jsonl", "cascade, spool fsync (default)"),
                    ("fsync-apart.jsonl", "  escalator's store off the agent disk"),
                    ("nofsync.jsonl", "cascade, spool without fsync")):
    if not (d / name).exists():
        continue
    r = load(name)
    print(f"{label:<36} {r['p50_us']:>7.0f}us {r['p99_us']:>7.0f}us {r['max_us']:>7.0f}us {r['over_40ms']:>6} {r['p50_us']/peer['p50_us']:>10.2f} {r['p99_us']/peer['p99_us']:>10.2f}")
print("goal: p50 ratio <= 1.5, p99 ratio <= 2, no round trip over 40 ms")
PY
