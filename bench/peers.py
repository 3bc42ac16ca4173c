#!/usr/bin/env python3
"""Time a model in onnxruntime (ONNX) or ai-edge-litert (TFLite) the way `edge-agent bench` does.

Same inputs recipe (deterministic values in [0, 1) for float inputs, pseudo-random bytes for int8),
same thread count, warm-up, then per-call latency of `session.run` / `interpreter.invoke`
(input copies happen outside the timed region, as in edge-agent bench). Prints one JSON object.

Note: these timings include the Python binding's per-call overhead (about a microsecond), which
matters only for models that run in a few microseconds.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def synthetic(shape, dtype, batch):
    shape = [batch if (d is None or isinstance(d, str) or d < 0) and i == 0 else (1 if (d is None or isinstance(d, str) or d < 0) else d) for i, d in enumerate(shape)]
    n = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(0x2545F4914F6CDD1D)
    if dtype == np.float32:
        return (rng.integers(0, 1000, size=n) / 1000.0).astype(np.float32).reshape(shape)
    if dtype == np.int8:
        return rng.integers(-128, 128, size=n, dtype=np.int8).reshape(shape)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=n, dtype=np.uint8).reshape(shape)
    return np.zeros(shape, dtype)


def percentiles(times):
    times = np.sort(np.array(times, dtype=np.float64)) / 1e3  # ns -> us
    pick = lambda p: float(times[min(len(times) - 1, int(round((len(times) - 1) * p)))])
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99), "mean_us": float(times.mean())}


def onnx(path, threads, warmup, iterations, batch):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int64)": np.int64}
    feeds = {i.name: synthetic(i.shape, types[i.type], batch) for i in session.get_inputs()}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(iterations):
        t = time.perf_counter_ns()
        session.run(None, feeds)
        times.append(time.perf_counter_ns() - t)
    return "onnxruntime", times, next(iter(feeds.values())).shape[0] if feeds else 1


def tflite(path, threads, warmup, iterations, batch):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    inputs = [(d["index"], synthetic(list(d["shape"]), d["dtype"], batch)) for d in interp.get_input_details()]
    for index, value in inputs:
        interp.set_tensor(index, value)
    for _ in range(warmup):
        interp.invoke()
    times = []
    for _ in range(iterations):
        for index, value in inputs:
            interp.set_tensor(index, value)
        t = time.perf_counter_ns()
        interp.invoke()
        times.append(time.perf_counter_ns() - t)
    return "ai-edge-litert (XNNPACK)", times, int(inputs[0][1].shape[0]) if inputs else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    head = args.model.read_bytes()[:8]
    run = tflite if head[4:8] == b"TFL3" else onnx
    runtime, times, batch = run(args.model, args.threads, args.warmup, args.iterations, args.batch)
    report = {"runtime": runtime, "model": str(args.model), "threads": args.threads, "batch": batch, "iterations": len(times)}
    report.update(percentiles(times))
    report["throughput"] = batch / (report["mean_us"] / 1e6)
    report["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(report))


if __name__ == "__main__":
    main()
