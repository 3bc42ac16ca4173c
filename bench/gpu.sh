#!/usr/bin/env bash
# The GPU engine against PyTorch on the bundled cloud model, batch by batch, in one run: samples/s
# of each, the ratio ours / PyTorch (above 1.0: Cascade is faster), and the TFLOPS achieved.
#
# Runs on the GPU machine, which has no Rust toolchain: build here, carry the binary there.
#   cargo build --release -p edge-agent --features cuda          # here
#   AGENT=target/release/edge-agent bench/gpu.sh                   # there (python3 with torch)
#   LD_LIBRARY_PATH=...: where libcublas.so.12 and libnvrtc.so.12 are (pip's nvidia-* packages:
#   the script adds the ones it finds under python3's site-packages).
#
# Both sides time a whole call: inputs copied to the GPU, the model, outputs copied back. Both run
# in fp32 (PyTorch with TF32 off). PyTorch runs the same architecture and shapes as
# models/digits-cloud.onnx (conv 32 -> conv 64 -> maxpool -> dense 128 -> 10) with random
# weights: the time does not depend on the weights' values.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENT=${AGENT:-target/release/edge-agent}
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-"1 8 32 128 512 2048"}
ITERATIONS=${ITERATIONS:-200}
WARMUP=${WARMUP:-20}
MODEL=models/digits-cloud.onnx

# cuBLAS and NVRTC from pip wheels (nvidia-cublas-cu12, nvidia-cuda-nvrtc-cu12) are not on the
# loader's path by default.
extra=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "*", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

"$PYTHON" - "$AGENT" "$MODEL" "$ITERATIONS" "$WARMUP" $BATCHES <<'PY'
import json, subprocess, sys
agent, model, iterations, warmup = sys.argv[1:5]
batches = [int(b) for b in sys.argv[5:]]
# Multiply-adds of one sample, x2: conv1 8x8x32x(1x3x3), conv2 8x8x64x(32x3x3), dense 1024x128, 128x10.
flops_per_sample = 2 * (8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 1024 * 128 + 128 * 10)
common = ["--iterations", iterations, "--warmup", warmup]
print(f"{'batch':>6} {'cascade/s':>12} {'pytorch/s':>12} {'ratio':>6} {'cascade TFLOPS':>15} {'pytorch TFLOPS':>15}")
for batch in batches:
    ours = json.loads(subprocess.run([agent, "bench", "--model", model, "--backend", "cuda", "--batch", str(batch), "--json", *common],
                                     check=True, capture_output=True, text=True).stdout)
    if ours["backend"] != "cuda":
        sys.exit(f"the model ran on {ours['backend']}, not the GPU: see the agent's log line (run it by hand)")
    peer = json.loads(subprocess.run([sys.executable, "bench/gpu_torch.py", "--batch", str(batch), *common],
                                     check=True, capture_output=True, text=True).stdout)
    ours_rate = batch * 1e6 / ours["p50_us"]
    peer_rate = batch * 1e6 / peer["p50_us"]
    print(f"{batch:>6} {ours_rate:>12.0f} {peer_rate:>12.0f} {ours_rate / peer_rate:>6.2f} "
          f"{ours_rate * flops_per_sample / 1e12:>15.3f} {peer_rate * flops_per_sample / 1e12:>15.3f}")
print(f"GPU: {peer['device']}")
PY
