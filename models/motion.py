#!/usr/bin/env python3
"""Generate the bundled sensor model: motion-edge.onnx, a three-class motion classifier for the
firmware's LIS3DH accelerometer windows (still / walking / shaking).

Data: SYNTHETIC. No accelerometer recording is bundled with Cascade, so the training and test
windows are simulated from a simple physical model of a body-worn or hand-held sensor, at the
firmware's defaults (50 Hz, +-4 g, 2 mg per count, 12-bit, clipped):

  every class   gravity (1 g) along a random mounting orientation, sensor noise (LIS3DH:
                ~220 ug/sqrt(Hz) in high-resolution mode, so a few mg at 25 Hz bandwidth) plus
                slow drift, then quantized to 2 mg counts and clipped to +-4 g
  still         resting on a table or held still: the above plus a little hand tremor
                (8-12 Hz, <= 10 mg); in 30% of windows also picked up or nudged
                (0.4-2 Hz, <= 0.12 g)
  walking       step cadence 1.5-2.3 Hz: vertical bounce 0.05-0.45 g at the cadence and its
                second harmonic, lateral sway 0.03-0.15 g at half the cadence
  shaking       the sensor shaken by hand: 2.5-8 Hz, 0.25-2.5 g along a random axis

A model trained on this is a demonstration of the pipeline (firmware -> agent -> model ->
escalation), not a validated activity recogniser; retrain on real recordings before relying on it.

Model (float, opset 13; motion-edge.onnx.toml is its sidecar):
  input   "window" float32 [1, 192]: 64 samples x (x, y, z) in g, interleaved as the firmware
          sends them (1.28 s at 50 Hz)
  features, orientation-free: log of the total standard deviation, of the magnitude's standard
          deviation, of the mean absolute sample-to-sample change, and the mean magnitude
  MLP     4 -> 16 (ReLU, the embedding) -> 3, softmax

Test data: data/motion-test/inputs.npy (float32 [300, 192]) and labels.npy; references from
onnxruntime in data/references/motion-edge.onnx.*.npy.

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install numpy==2.4.6 onnx==1.23.2 onnxruntime==1.32.0
    /tmp/gen/bin/python models/motion.py           # rewrites the motion files and manifest.toml
"""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from manifest import HERE, write_manifest

LABELS = ["still", "walking", "shaking"]
RATE_HZ = 50
SAMPLES = 64
G_PER_COUNT = 0.002  # +-4 g, high-resolution mode
FULL_SCALE_COUNTS = 2047


def random_rotation(rng):
    """A uniformly random rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def window(rng, label):
    """One window [SAMPLES, 3] in g, in the sensor's frame, quantized as the firmware sends it."""
    t = (np.arange(SAMPLES) + rng.uniform(0, SAMPLES)) / RATE_HZ
    body = np.zeros((SAMPLES, 3))  # body frame: z up
    body[:, 2] = 1.0
    if label == "still":
        f = rng.uniform(8, 12)
        body += rng.uniform(0, 0.01) * np.sin(2 * np.pi * f * t[:, None] + rng.uniform(0, 2 * np.pi, 3))
        # Now and then picked up or nudged: a slow movement of up to 0.12 g.
        if rng.uniform() < 0.3:
            body += rng.uniform(0, 0.12) * np.sin(2 * np.pi * rng.uniform(0.4, 2) * t[:, None] + rng.uniform(0, 2 * np.pi, 3))
    elif label == "walking":
        cadence = rng.uniform(1.5, 2.3)
        phase = rng.uniform(0, 2 * np.pi, 3)
        bounce = rng.uniform(0.05, 0.45)
        body[:, 2] += bounce * np.sin(2 * np.pi * cadence * t + phase[0])
        body[:, 2] += rng.uniform(0.2, 0.5) * bounce * np.sin(4 * np.pi * cadence * t + phase[1])
        sway = rng.uniform(0.03, 0.15)
        body[:, 0] += sway * np.sin(np.pi * cadence * t + phase[2])
        body[:, 1] += rng.uniform(0.3, 1.0) * sway * np.sin(2 * np.pi * cadence * t + phase[0])
    elif label == "shaking":
        f = rng.uniform(2.5, 8)
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        amplitude = rng.uniform(0.25, 2.5)
        wobble = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.3, 1) * t)
        body += (amplitude * wobble * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)))[:, None] * axis
    else:
        raise ValueError(label)
    drift = np.cumsum(rng.normal(0, 0.0005, size=(SAMPLES, 3)), axis=0)
    noise = rng.normal(0, rng.uniform(0.002, 0.006), size=(SAMPLES, 3))
    sensor = body @ random_rotation(rng).T + drift + noise
    counts = np.clip(np.round(sensor / G_PER_COUNT), -FULL_SCALE_COUNTS - 1, FULL_SCALE_COUNTS)
    return (counts * G_PER_COUNT).astype(np.float32)


def dataset(rng, per_class):
    x, y = [], []
    for label_index, label in enumerate(LABELS):
        for _ in range(per_class):
            x.append(window(rng, label).reshape(-1))
            y.append(label_index)
    order = rng.permutation(len(y))
    return np.stack(x)[order], np.array(y, dtype=np.int64)[order]


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def feature_nodes():
    """Nodes computing features [N, 4] from "window" [N, 192]. Shared by the training graph
    (run by onnxruntime to get the features to train on) and the shipped model, so the two can
    not drift apart."""
    eps = 1e-6
    nodes = [
        helper.make_node("Reshape", ["window", "shape"], ["xyz"]),
        # Total standard deviation: sqrt of the summed per-axis variances (rotation-invariant).
        helper.make_node("ReduceMean", ["xyz"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["xyz", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[1], keepdims=0),
        helper.make_node("ReduceSum", ["variance", "axis1"], ["total_variance"], keepdims=1),
        helper.make_node("Add", ["total_variance", "eps"], ["total_variance_eps"]),
        helper.make_node("Log", ["total_variance_eps"], ["f_total"]),
        # Magnitude: its mean (about 1 g unless shaken) and standard deviation.
        helper.make_node("ReduceSumSquare", ["xyz"], ["magnitude_squared"], axes=[2], keepdims=0),
        helper.make_node("Sqrt", ["magnitude_squared"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["f_magnitude"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["magnitude", "f_magnitude"], ["magnitude_centered"]),
        helper.make_node("Mul", ["magnitude_centered", "magnitude_centered"], ["magnitude_squared_dev"]),
        helper.make_node("ReduceMean", ["magnitude_squared_dev"], ["magnitude_variance"], axes=[1], keepdims=1),
        helper.make_node("Add", ["magnitude_variance", "eps"], ["magnitude_variance_eps"]),
        helper.make_node("Log", ["magnitude_variance_eps"], ["f_magnitude_spread"]),
        # Jerk: mean absolute change between consecutive samples.
        helper.make_node("Slice", ["xyz", "one", "end", "axis1"], ["later"]),
        helper.make_node("Slice", ["xyz", "zero", "minus_one", "axis1"], ["earlier"]),
        helper.make_node("Sub", ["later", "earlier"], ["change"]),
        helper.make_node("Abs", ["change"], ["abs_change"]),
        helper.make_node("ReduceMean", ["abs_change"], ["jerk"], axes=[1, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["jerk", "axis1"], ["jerk_column"]),
        helper.make_node("Add", ["jerk_column", "eps"], ["jerk_eps"]),
        helper.make_node("Log", ["jerk_eps"], ["f_jerk"]),
        helper.make_node("Concat", ["f_total", "f_magnitude_spread", "f_jerk", "f_magnitude"], ["features"], axis=1),
    ]
    initializers = [
        const("shape", np.array([-1, SAMPLES, 3], dtype=np.int64)),
        const("eps", np.array(eps, dtype=np.float32)),
        const("axis1", np.array([1], dtype=np.int64)),
        const("zero", np.array([0], dtype=np.int64)),
        const("one", np.array([1], dtype=np.int64)),
        const("minus_one", np.array([-1], dtype=np.int64)),
        const("end", np.array([SAMPLES], dtype=np.int64)),
    ]
    return nodes, initializers


def graph(extra_nodes, extra_initializers, outputs, batch):
    nodes, initializers = feature_nodes()
    window_input = helper.make_tensor_value_info("window", TensorProto.FLOAT, [batch, SAMPLES * 3])
    return helper.make_graph(nodes + extra_nodes, "motion", [window_input], outputs, initializers + extra_initializers)


def model_proto(g):
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="cascade models/motion.py")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def features(x):
    out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])
    m = model_proto(graph([], [], [out], "N"))
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"window": x})[0]


def train(f, y, rng, hidden=16, steps=3000, lr=0.01):
    """A 4 -> 16 -> 3 MLP by full-batch Adam on standardized features; the standardization is
    folded into the first layer afterwards."""
    mu, sigma = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sigma
    params = {
        "w1": rng.normal(0, np.sqrt(2 / 4), size=(4, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0, np.sqrt(2 / hidden), size=(hidden, len(LABELS))),
        "b2": np.zeros(len(LABELS)),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    onehot = np.eye(len(LABELS))[y]
    for step in range(1, steps + 1):
        h = np.maximum(z @ params["w1"] + params["b1"], 0)
        logits = h @ params["w2"] + params["b2"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d_logits = (p - onehot) / len(y)
        d_h = d_logits @ params["w2"].T * (h > 0)
        grads = {
            "w2": h.T @ d_logits + 1e-4 * params["w2"],
            "b2": d_logits.sum(0),
            "w1": z.T @ d_h + 1e-4 * params["w1"],
            "b1": d_h.sum(0),
        }
        for k, g in grads.items():
            m, v = moments[k]
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            moments[k] = (m, v)
            params[k] -= lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    w1 = params["w1"] / sigma[:, None]
    b1 = params["b1"] - mu @ w1
    return w1.astype(np.float32), b1.astype(np.float32), params["w2"].astype(np.float32), params["b2"].astype(np.float32)


def export(weights, path):
    w1, b1, w2, b2 = weights
    nodes = [
        helper.make_node("Gemm", ["features", "w1", "b1"], ["hidden"]),
        helper.make_node("Relu", ["hidden"], ["embedding"]),
        helper.make_node("Gemm", ["embedding", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [const("w1", w1), const("b1", b1), const("w2", w2), const("b2", b2)]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, len(LABELS)]),
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 16]),
    ]
    onnx.save(model_proto(graph(nodes, initializers, outputs, 1)), path)


def sidecar(path, accuracy):
    text = f'''name = "motion-edge"
version = "1.0.0"
task = "classification"
labels = [{", ".join(f'"{label}"' for label in LABELS)}]
description = "motion classifier for LIS3DH windows (64 samples x 3 axes in g at 50 Hz); trained on SYNTHETIC accelerometer data (models/motion.py); {accuracy:.1%} on its synthetic test split"

[[inputs]]
name = "window"
dtype = "float32"
shape = [1, {SAMPLES * 3}]
layout = "flat"

[outputs]
scores = "probabilities"
scores_kind = "probabilities"
embedding = "embedding"
'''
    (HERE / (path.name + ".toml")).write_text(text)


def main():
    rng = np.random.default_rng(20261123)
    x_train, y_train = dataset(rng, 1000)
    x_test, y_test = dataset(rng, 100)
    weights = train(features(x_train), y_train, rng)

    path = HERE / "motion-edge.onnx"
    export(weights, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = np.concatenate([session.run(["probabilities"], {"window": row[None]})[0] for row in x_test])
    accuracy = float((probabilities.argmax(1) == y_test).mean())
    print(f"motion-edge: {accuracy:.1%} on {len(y_test)} synthetic test windows")
    for i, label in enumerate(LABELS):
        print(f"  {label:8s} {(probabilities[y_test == i].argmax(1) == i).mean():.1%}")
    sidecar(path, accuracy)

    test_dir = HERE / "data" / "motion-test"
    test_dir.mkdir(parents=True, exist_ok=True)
    np.save(test_dir / "inputs.npy", x_test)
    np.save(test_dir / "labels.npy", y_test)
    references = HERE / "data" / "references"
    references.mkdir(parents=True, exist_ok=True)
    first = [session.run(None, {"window": row[None]}) for row in x_test[:32]]
    np.save(references / "motion-edge.onnx.probabilities.npy", np.concatenate([p for p, _ in first]))
    np.save(references / "motion-edge.onnx.embedding.npy", np.concatenate([e for _, e in first]))
    write_manifest()


if __name__ == "__main__":
    main()
