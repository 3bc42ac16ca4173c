#!/usr/bin/env bash
# Records which functions of the edge agent run in its steady state (classifying and escalating
# inputs, after start-up) and writes them to edge-agent/steady-state.order. The release link puts
# those functions next to each other (lld's --symbol-ordering-file, edge-agent/build.rs), so the
# code pages that come back after `release_startup_code_s` gives start-up's pages back are few
# and dense (docs/agent.md, "Memory").
#
#   bench/record_code_order.sh       # then rebuild: cargo build --release -p edge-agent
#
# Run it again when the steady-state path changes much: symbols that no longer exist are ignored
# at link time, so a stale list only costs memory, never correctness.
#
# How: the agent runs under callgrind with instrumentation off; once connected it is switched on, the
# held-out set is classified through stdin (as bench/agent_footprint.sh does), and every function
# of the agent's own binary that ran is listed (mangled names, as the linker sees them).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/digits-edge.int8.tflite}
OUT=${OUT:-edge-agent/steady-state.order}

# The release profile keeps the symbol table, which names the functions. Recorded from a build
# without the current list (CASCADE_CODE_ORDER=0, edge-agent/build.rs), kept as $AGENT.plain for
# comparison; build again afterwards to link with the new list.
echo "building edge-agent (release, without the current order)" >&2
CASCADE_CODE_ORDER=0 cargo build --release --quiet -p edge-agent
cp target/release/edge-agent target/release/edge-agent.plain
AGENT=$PWD/target/release/edge-agent.plain

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n' "$port" > "$dir/mosquitto.conf"
mosquitto -c "$dir/mosquitto.conf" 2>/dev/null &
broker=$!
mkfifo "$dir/inputs"
cat > "$dir/agent.toml" <<TOML
device = "order"
state_dir = "$dir/state"
release_startup_code_s = 0
[model]
path = "$PWD/$MODEL"
[mqtt]
url = "mqtt://127.0.0.1:$port"
[sources]
stdin = true
[output]
jsonl = "$dir/results.jsonl"
TOML
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --demangle=no \
  --callgrind-out-file="$dir/callgrind.out" "$AGENT" run --config "$dir/agent.toml" < "$dir/inputs" 2> "$dir/valgrind.log" &
agent=$!
exec 3> "$dir/inputs"
trap 'exec 3>&-; kill $agent $broker 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do (exec 9<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
echo "waiting for the agent to connect (under valgrind: slow)" >&2
timeout 120 mosquitto_sub -p "$port" -t 'cascade/v1/default/order/status' -C 1 >/dev/null
# Give start-up's tail (first telemetry, subscriptions) time to pass before collecting.
sleep 5
callgrind_control -i on "$agent" >/dev/null
python3 bench/heldout.py >&3
rows=$(python3 bench/heldout.py --count)
for _ in $(seq 600); do
  [ "$(grep -c '"stage":"edge"' "$dir/results.jsonl" 2>/dev/null || echo 0)" -ge "$rows" ] && break
  sleep 1
done
echo "inputs classified: $(grep -c '"stage":"edge"' "$dir/results.jsonl")" >&2
# Escalated inputs wait for no verdict here (no escalator); their spool writes and publishes ran.
sleep 5
callgrind_control -d "$agent" >/dev/null
sleep 2
python3 - "$AGENT" "$OUT" "$dir"/callgrind.out* <<'PY'
import re, sys
agent, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
# callgrind compresses names: "fn=(12) name" defines id 12, later "fn=(12)" refers to it; "ob="
# names the object file the following functions belong to.
names, objects = {}, {}
ran = set()
for path in files:
    ob = None
    for line in open(path, errors="replace"):
        m = re.match(r"^(c?)(ob|fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if not m:
            continue
        called, kind, key, name = m.groups()
        table = objects if kind == "ob" else names
        if name is not None:
            table[key] = name
        if called:
            continue
        if kind == "ob":
            ob = objects.get(key)
        elif ob == agent:
            ran.add(names.get(key))
symbols = sorted(s for s in ran if s and not s.startswith("0x"))
with open(out, "w") as f:
    f.write("".join(s + "\n" for s in symbols))
print(f"{len(symbols)} functions of {agent} ran in the steady state; written to {out}", file=sys.stderr)
PY
