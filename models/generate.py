#!/usr/bin/env python3
"""Regenerate Cascade's bundled models, their metadata sidecars and the held-out test split.

Data: scikit-learn's handwritten digits (1797 8x8 grayscale images, 10 classes, shipped inside
the scikit-learn wheel). A stratified split keeps 20% (360 images) as the held-out test set,
which no model sees during training or calibration.

Models (every file gets a `<file>.toml` metadata sidecar):
  digits-edge.f32.onnx    edge MLP 64 -> 16 (ReLU, the embedding) -> 10, float
  digits-edge.int8.onnx   the same weights, int8 (QLinearMatMul; onnxruntime static quantization)
  digits-edge.int8.tflite the same weights, fully int8 with float input/output (TFLite converter)
  digits-cloud.onnx       cloud CNN: conv 32 -> conv 64 -> maxpool -> dense 128 -> 10, float
  digits-tail.onnx        cloud tail MLP: edge embedding (16) -> 64 -> 10, float

Test data:
  data/digits-test/       held-out inputs.npy (float32 [360, 64], pixels / 16) and labels.npy
  data/references/        outputs of onnxruntime (ONNX) and LiteRT's reference kernels (TFLite)
                          for the first 32 test inputs, to check Cascade's engine against
  testdata/               small models for the engine's own tests and the benchmarks: a no-op
                          (softmax) model; two inputs (one 0-d) and two
                          oddly named outputs; the edge model with int8 input and output; and
                          models with an operator no backend supports, and one only TFLite's
                          own interpreter runs (DEPTH_TO_SPACE); the edge model with per-tensor
                          weight scales (for the TFLite interpreter backend's tests)

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install -r models/requirements.txt
    /tmp/gen/bin/python models/generate.py          # rewrites models/ and models/manifest.toml

CI does not retrain: it checks every file listed in models/manifest.toml against its sha256.
"""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from manifest import write_manifest

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "digits-test"
SEED = 20261123
EMBEDDING = 16
LABELS = [str(d) for d in range(10)]


def set_seeds():
    np.random.seed(SEED)
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()


def split():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
    return x_train, y_train, x_test, y_test


def train_edge(x, y):
    inputs = tf.keras.Input(shape=(64,), name="pixels")
    embedding = tf.keras.layers.Dense(EMBEDDING, activation="relu", name="embedding")(inputs)
    logits = tf.keras.layers.Dense(10, name="logits")(embedding)
    probabilities = tf.keras.layers.Softmax(name="probabilities")(logits)
    model = tf.keras.Model(inputs, [probabilities, embedding])
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss=["sparse_categorical_crossentropy", None])
    model.fit(x, y, epochs=40, batch_size=64, verbose=0)
    return model


def train_cloud(x, y):
    inputs = tf.keras.Input(shape=(64,), name="pixels")
    h = tf.keras.layers.Reshape((8, 8, 1))(inputs)
    h = tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu")(h)
    h = tf.keras.layers.MaxPooling2D(2)(h)
    h = tf.keras.layers.Flatten()(h)
    h = tf.keras.layers.Dense(128, activation="relu")(h)
    h = tf.keras.layers.Dropout(0.3)(h)
    out = tf.keras.layers.Dense(10, activation="softmax")(h)
    model = tf.keras.Model(inputs, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.002), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=60, batch_size=64, verbose=0)
    return model


def train_tail(embeddings, y):
    inputs = tf.keras.Input(shape=(EMBEDDING,), name="embedding")
    h = tf.keras.layers.Dense(64, activation="relu")(inputs)
    out = tf.keras.layers.Dense(10, activation="softmax")(h)
    model = tf.keras.Model(inputs, out)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(embeddings, y, epochs=60, batch_size=64, verbose=0)
    return model


def dense_weights(model):
    return [(l.kernel.numpy(), l.bias.numpy()) for l in model.layers if isinstance(l, tf.keras.layers.Dense)]


def save_onnx(graph, path, producer):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name=producer)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def init(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def edge_onnx(model, path):
    (w1, b1), (w2, b2) = dense_weights(model)
    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits-edge",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING]),
        ],
        [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)],
    )
    save_onnx(graph, path, "cascade models/generate.py")


def quantize_onnx(src, dst, calibration):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixels": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    # QOperator format gives standard QLinearMatMul nodes, which run on int8 kernels. Only MatMul
    # is quantized: onnxruntime would otherwise emit com.microsoft contrib ops (QLinearAdd, ...).
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QOperator,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=False,
    )


def edge_tflite(model, path, calibration):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path.write_bytes(converter.convert())


def cloud_onnx(model, path):
    convs = [l for l in model.layers if isinstance(l, tf.keras.layers.Conv2D)]
    (wd1, bd1), (wd2, bd2) = dense_weights(model)
    inits = [init("shape_nhwc", np.array([-1, 8, 8, 1], np.int64)), init("shape_flat", np.array([-1, 1024], np.int64))]
    nodes = [
        helper.make_node("Reshape", ["pixels", "shape_nhwc"], ["nhwc"]),
        helper.make_node("Transpose", ["nhwc"], ["x"], perm=[0, 3, 1, 2]),
    ]
    prev = "x"
    for i, conv in enumerate(convs):
        # Keras kernels are [kh, kw, in, out]; ONNX wants [out, in, kh, kw].
        inits += [init(f"conv{i}_w", conv.kernel.numpy().transpose(3, 2, 0, 1)), init(f"conv{i}_b", conv.bias.numpy())]
        nodes += [
            helper.make_node("Conv", [prev, f"conv{i}_w", f"conv{i}_b"], [f"conv{i}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
        ]
        prev = f"relu{i}"
    # Back to NHWC before flattening so the Dense kernel applies unchanged.
    nodes += [
        helper.make_node("MaxPool", [prev], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["pool"], ["pool_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["pool_nhwc", "shape_flat"], ["flat"]),
        helper.make_node("Gemm", ["flat", "d1_w", "d1_b"], ["d1"]),
        helper.make_node("Relu", ["d1"], ["d1r"]),
        helper.make_node("Gemm", ["d1r", "d2_w", "d2_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    inits += [init("d1_w", wd1), init("d1_b", bd1), init("d2_w", wd2), init("d2_b", bd2)]
    graph = helper.make_graph(
        nodes,
        "digits-cloud",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    save_onnx(graph, path, "cascade models/generate.py")


def tail_onnx(model, path):
    (w1, b1), (w2, b2) = dense_weights(model)
    nodes = [
        helper.make_node("Gemm", ["embedding", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits-tail",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)],
    )
    save_onnx(graph, path, "cascade models/generate.py")


def sidecar(path, name, version, task, description, inputs, scores, embedding=None):
    lines = [
        f'name = "{name}"',
        f'version = "{version}"',
        f'task = "{task}"',
        "labels = [" + ", ".join(f'"{l}"' for l in LABELS) + "]",
        f'description = "{description}"',
        "",
    ]
    for spec in inputs:
        lines += ["[[inputs]]", f'name = "{spec["name"]}"', f'dtype = "{spec["dtype"]}"', f"shape = {spec['shape']}"]
        if "layout" in spec:
            lines.append(f'layout = "{spec["layout"]}"')
        if spec.get("image"):
            # The digits are light ink on a dark background, 0..16; an image pixel 0..255 maps to 0..1.
            lines += ["[inputs.image]", "width = 8", "height = 8", "channels = 1", "scale = 0.003921569"]
        lines.append("")
    lines += ["[outputs]", f'scores = "{scores}"', 'scores_kind = "probabilities"']
    if embedding:
        lines.append(f'embedding = "{embedding}"')
    Path(str(path) + ".toml").write_text("\n".join(lines) + "\n")


def tflite_io_names(path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    inputs = interp.get_input_details()
    outputs = interp.get_output_details()
    by_width = {int(o["shape"][-1]): o["name"] for o in outputs}
    return inputs[0]["name"], by_width[10], by_width[EMBEDDING]


def references(x):
    """Reference outputs of the bundled models on the first 32 test inputs."""
    import onnxruntime as ort

    out = HERE / "data" / "references"
    out.mkdir(parents=True, exist_ok=True)
    x = x[:32]
    for name in ["digits-edge.f32.onnx", "digits-edge.int8.onnx", "digits-cloud.onnx"]:
        session = ort.InferenceSession(str(HERE / name), providers=["CPUExecutionProvider"])
        for o, value in zip(session.get_outputs(), session.run(None, {"pixels": x})):
            np.save(out / f"{name}.{o.name}.npy", value)
    steps = ["# One quantization step of the int8 tensor each float output of the TFLite model was", "# dequantized from: the tolerance for comparing against the reference kernels.", ""]
    # The second file is the TFLite interpreter backend's (shared/infer/tests/interpreter.rs).
    for path in [HERE / "digits-edge.int8.tflite", HERE / "testdata" / "digits-edge.int8.per-tensor.tflite"]:
        steps += tflite_references(path, x, out)
    (out / "steps.toml").write_text("\n".join(steps) + "\n")


def tflite_references(path, x, out):
    """LiteRT's reference kernels' outputs of a TFLite model on `x`, saved as
    `<file name>.<output>.npy`; returns the steps.toml lines: one quantization step per output."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    results = {o["name"]: [] for o in interp.get_output_details()}
    for row in x:
        interp.set_tensor(interp.get_input_details()[0]["index"], row[None])
        interp.invoke()
        for o in interp.get_output_details():
            results[o["name"]].append(interp.get_tensor(o["index"])[0])
    producers = {o: op for op in interp._get_ops_details() for o in op["outputs"]}
    details = {t["index"]: t for t in interp.get_tensor_details()}
    steps = []
    for o in interp.get_output_details():
        file = f"{path.name}.{o['name'].replace(':', '_')}.npy"
        np.save(out / file, np.stack(results[o["name"]]))
        op = producers[o["index"]]
        steps.append(f'"{file}" = {float(details[op["inputs"][0]]["quantization"][0])!r}')
    return steps


def noop(out):
    """A model that does next to nothing (softmax over 10 values): for measuring Cascade's own
    overhead and round trip, edge and cloud, without a model's time in the way."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["probabilities"], axis=1)],
        "noop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
    )
    save_onnx(graph, out / "noop.onnx", "cascade models/generate.py")
    sidecar(
        out / "noop.onnx",
        "noop",
        "1.0.0",
        "classification",
        "softmax over its input: a stand-in model for overhead and round-trip benchmarks",
        [{"name": "x", "dtype": "float32", "shape": [-1, 10]}],
        "probabilities",
    )


def testdata(edge, calibration):
    out = HERE / "testdata"
    out.mkdir(exist_ok=True)
    # Two inputs, one of them 0-d; two outputs whose names are not file-system safe.
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum:0"]), helper.make_node("Mul", ["a", "b"], ["scaled/1"])],
        "two-in-two-out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("sum:0", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("scaled/1", TensorProto.FLOAT, [2, 3])],
    )
    save_onnx(graph, out / "two-in-two-out.onnx", "cascade models/generate.py")
    noop(out)
    # An operator from a domain nobody implements.
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        "unsupported-op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, out / "unsupported-op.onnx")
    # The edge model with int8 input and output (a fully quantized model end to end).
    converter = tf.lite.TFLiteConverter.from_keras_model(edge)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    (out / "digits-edge.int8io.tflite").write_bytes(converter.convert())
    # A TFLite operator Cascade's frontend does not translate (CUMSUM).
    cumsum = tf.keras.Sequential([tf.keras.Input(shape=(4,)), tf.keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=1))])
    (out / "unsupported-op.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(cumsum).convert())
    interpreter_only(out)
    per_tensor_tflite(edge, out / "digits-edge.int8.per-tensor.tflite", calibration)
    qlinear_matmul(out)


def qlinear_matmul(out):
    """QLinearMatMul with uint8 activations, int8 weights with per-column scales and zero points,
    a rank-3 input, and values that land on rounding ties: once with constant weights (Cascade's
    integer kernel) and once with the weights as an input (tract's own translation), with
    onnxruntime's outputs to match exactly."""
    import onnxruntime as ort

    rng = np.random.default_rng(SEED)
    # Small values and scales whose products are 2^-1 to 2^-3: many accumulators land on .5 ties.
    a = rng.integers(0, 12, size=(2, 3, 4), dtype=np.uint8)
    b = rng.integers(-9, 10, size=(4, 5), dtype=np.int8)
    consts = [
        init("a_scale", np.array(0.5, np.float32)),
        init("a_zero_point", np.array(3, np.uint8)),
        init("b_scale", np.array([0.25, 0.125, 0.0625, 0.25, 0.125], np.float32)),
        init("b_zero_point", np.array([0, 1, -2, 0, 3], np.int8)),
        init("y_scale", np.array(0.25, np.float32)),
        init("y_zero_point", np.array(128, np.uint8)),
    ]
    names = ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"]
    node = helper.make_node("QLinearMatMul", names, ["y"])
    a_info = helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 3, 4])
    y_info = helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 3, 5])
    dest = out / "qlinear"
    dest.mkdir(exist_ok=True)
    constant = helper.make_graph([node], "qlinear-const", [a_info], [y_info], consts + [init("b", b)])
    save_onnx(constant, dest / "const-weights.onnx", "cascade models/generate.py")
    b_info = helper.make_tensor_value_info("b", TensorProto.INT8, [4, 5])
    dynamic = helper.make_graph([node], "qlinear-input", [a_info, b_info], [y_info], consts)
    save_onnx(dynamic, dest / "input-weights.onnx", "cascade models/generate.py")
    y = ort.InferenceSession(str(dest / "const-weights.onnx"), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    np.save(dest / "a.npy", a)
    np.save(dest / "b.npy", b)
    np.save(dest / "y.npy", y)


def per_tensor_tflite(edge, path, calibration):
    """The edge model with one weight scale per tensor, as converters before TF 2.14 wrote it: the
    TFLite runtime the `tflite` crate vendors reads only the first scale of per-channel
    FULLY_CONNECTED weights, so it runs this file but not digits-edge.int8.tflite."""
    converter = tf.lite.TFLiteConverter.from_keras_model(edge)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    path.write_bytes(converter.convert())


def interpreter_only(out):
    """A TFLite model tract cannot load but TFLite's own interpreter can (DEPTH_TO_SPACE): proves
    that `auto` falls back to the interpreter in a build with feature `tflite`."""
    d2s = tf.keras.Sequential([tf.keras.Input(shape=(2, 2, 4), batch_size=1), tf.keras.layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2))])
    (out / "depth-to-space.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(d2s).convert())


def accuracy(probabilities, y):
    return float((probabilities.argmax(-1) == y).mean())


def main():
    set_seeds()
    x_train, y_train, x_test, y_test = split()
    DATA.mkdir(parents=True, exist_ok=True)
    np.save(DATA / "inputs.npy", x_test)
    np.save(DATA / "labels.npy", y_test)
    # A few test images as PNG (light ink on dark, 8x8) for trying image inputs.
    from PIL import Image

    for i in range(3):
        pixels = (x_test[i].reshape(8, 8) * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(DATA / f"sample-{i}-label-{y_test[i]}.png")

    edge = train_edge(x_train, y_train)
    cloud = train_cloud(x_train, y_train)
    train_embeddings = edge.predict(x_train, verbose=0)[1]
    tail = train_tail(train_embeddings, y_train)
    calibration = x_train[:200]

    edge_onnx(edge, HERE / "digits-edge.f32.onnx")
    quantize_onnx(HERE / "digits-edge.f32.onnx", HERE / "digits-edge.int8.onnx", calibration)
    edge_tflite(edge, HERE / "digits-edge.int8.tflite", calibration)
    cloud_onnx(cloud, HERE / "digits-cloud.onnx")
    tail_onnx(tail, HERE / "digits-tail.onnx")

    # The hand-written ONNX graphs must compute what Keras computes.
    import onnxruntime as ort

    def run(path, feed):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, feed)

    keras_edge = edge.predict(x_test, verbose=0)
    onnx_edge = run(HERE / "digits-edge.f32.onnx", {"pixels": x_test})
    assert np.abs(keras_edge[0] - onnx_edge[0]).max() < 1e-5, "edge ONNX differs from Keras"
    assert np.abs(cloud.predict(x_test, verbose=0) - run(HERE / "digits-cloud.onnx", {"pixels": x_test})[0]).max() < 1e-4
    test_embeddings = keras_edge[1]
    assert np.abs(tail.predict(test_embeddings, verbose=0) - run(HERE / "digits-tail.onnx", {"embedding": test_embeddings})[0]).max() < 1e-5

    describe = "trained on scikit-learn digits (1437 images); held-out test split in data/digits-test"
    pixels = {"name": "pixels", "dtype": "float32", "shape": [-1, 64], "layout": "flat", "image": True}
    sidecar(HERE / "digits-edge.f32.onnx", "digits-edge", "1.0.0", "classification", "edge MLP, float; " + describe, [pixels], "probabilities", "embedding")
    sidecar(HERE / "digits-edge.int8.onnx", "digits-edge", "1.0.0", "classification", "edge MLP, int8 (QLinearMatMul); " + describe, [pixels], "probabilities", "embedding")
    t_in, t_probs, t_emb = tflite_io_names(HERE / "digits-edge.int8.tflite")
    sidecar(
        HERE / "digits-edge.int8.tflite",
        "digits-edge",
        "1.0.0",
        "classification",
        "edge MLP, fully int8 with float I/O; " + describe,
        [{"name": t_in, "dtype": "float32", "shape": [1, 64], "layout": "flat", "image": True}],
        t_probs,
        t_emb,
    )
    sidecar(HERE / "digits-cloud.onnx", "digits-cloud", "1.0.0", "classification", "cloud CNN, float; " + describe, [pixels], "probabilities")
    sidecar(
        HERE / "digits-tail.onnx",
        "digits-tail",
        "1.0.0",
        "embedding_classification",
        "cloud tail MLP over the edge model's 16-d embedding; " + describe,
        [{"name": "embedding", "dtype": "float32", "shape": [-1, EMBEDDING]}],
        "probabilities",
    )
    testdata(edge, calibration)
    references(x_test)
    write_manifest()
    print(f"edge (Keras, float): {accuracy(keras_edge[0], y_test):.4f}")
    print(f"cloud (Keras):       {accuracy(cloud.predict(x_test, verbose=0), y_test):.4f}")
    print(f"tail (Keras):        {accuracy(tail.predict(test_embeddings, verbose=0), y_test):.4f}")
    print(f"edge int8 ONNX (onnxruntime): {accuracy(run(HERE / 'digits-edge.int8.onnx', {'pixels': x_test})[0], y_test):.4f}")


if __name__ == "__main__":
    main()
