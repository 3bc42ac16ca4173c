#!/usr/bin/env bash
# Cascade's engine against onnxruntime and LiteRT on the same model files, same thread count,
# same synthetic inputs, in one run. Prints p50 latency of each and the ratio ours / peer
# (below 1.0: Cascade is faster).
#
#   bench/infer_vs_peers.sh                 # bundled edge models, 1 thread
#   THREADS=2 bench/infer_vs_peers.sh models/digits-cloud.onnx target/thirdparty/models/*.tflite
#   TFLITE=1 bench/infer_vs_peers.sh target/thirdparty/models/*.tflite
#                                           # also TFLite's own interpreter (--features tflite)
#
# Peers install into a virtual environment ($PEERS, default /tmp/peers) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-1}
ITERATIONS=${ITERATIONS:-2000}
WARMUP=${WARMUP:-200}
PEERS=${PEERS:-/tmp/peers}

if [ ! -x "$PEERS/bin/python" ] || ! "$PEERS/bin/python" -c "import onnxruntime, ai_edge_litert" 2>/dev/null; then
  echo "installing onnxruntime and ai-edge-litert into $PEERS" >&2
  python3 -m venv "$PEERS"
  "$PEERS/bin/pip" install --quiet numpy==2.4.6 onnxruntime==1.32.0 ai-edge-litert==2.3.0
fi

TFLITE=${TFLITE:-0}
features=()
[ "$TFLITE" = 1 ] && features=(--features tflite)
echo "building edge-agent (release${features[*]:+, ${features[*]}})" >&2
cargo build --release --quiet -p edge-agent "${features[@]}"
AGENT=target/release/edge-agent

if [ $# -eq 0 ]; then
  set -- models/digits-edge.f32.onnx models/digits-edge.int8.onnx models/digits-edge.int8.tflite models/digits-cloud.onnx
fi

"$PEERS/bin/python" - "$THREADS" "$ITERATIONS" "$WARMUP" "$AGENT" "$PEERS/bin/python" "$TFLITE" "$@" <<'PY'
import json, subprocess, sys
threads, iterations, warmup, agent, python, interpreter = sys.argv[1:7]
models = sys.argv[7:]
common = ["--threads", threads, "--iterations", iterations, "--warmup", warmup]
print(f"threads={threads} iterations={iterations} warmup={warmup}")
print(f"{'model':<44} {'cascade p50':>12} {'peer':<26} {'peer p50':>10} {'ratio':>6}")
for model in models:
    ours = json.loads(subprocess.run([agent, "bench", "--model", model, "--json", *common], check=True, capture_output=True, text=True).stdout)
    peer = json.loads(subprocess.run([python, "bench/peers.py", model, *common], check=True, capture_output=True, text=True).stdout)
    ratio = ours["p50_us"] / peer["p50_us"]
    print(f"{model:<44} {ours['p50_us']:>9.1f} us {peer['runtime']:<26} {peer['p50_us']:>7.1f} us {ratio:>6.2f}")
    if interpreter == "1" and model.endswith(".tflite"):
        run = subprocess.run([agent, "bench", "--model", model, "--backend", "tflite", "--json", *common], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{'  on the TFLite interpreter':<44} refused: {run.stderr.strip().splitlines()[0]}")
            continue
        tfl = json.loads(run.stdout)
        print(f"{'  on the TFLite interpreter':<44} {tfl['p50_us']:>9.1f} us {peer['runtime']:<26} {peer['p50_us']:>7.1f} us {tfl['p50_us'] / peer['p50_us']:>6.2f}")
PY
