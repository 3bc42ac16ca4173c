#!/usr/bin/env python3
"""Produce reference inputs and outputs for the third-party models (run by a developer, not CI).

For every case in cases.toml this writes refs/<id>/:
  s<step>_in<i>.npy    inputs, in the model's input order (images as uint8; see input_scale)
  s<step>_out<i>.npy   outputs of the reference runtime:
                       onnxruntime for ONNX; LiteRT's *reference kernels* (BUILTIN_REF) for TFLite
  s<step>_xnn<i>.npy   TFLite only: LiteRT's default (XNNPACK) outputs, to measure how far the
                       optimized runtime itself strays from the reference kernels
  meta.toml            steps, and per output the quantization step for int8 comparisons

Inputs come from a real photograph (scikit-learn's bundled sample image) for image models, and
from seeded noise plus tones for audio and feature models, so activations are realistic.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install -r models/thirdparty/requirements.txt
    python3 models/thirdparty/fetch.py
    /tmp/peers/bin/python models/thirdparty/make_references.py
"""

import argparse
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def photo(height, width):
    """A real photograph resized to height x width, uint8 HWC."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg")).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def image_input(case, shape, layout):
    if layout == "NHWC":
        _, h, w, c = shape
        pixels = photo(h, w)[..., :c]
    else:
        _, c, h, w = shape
        pixels = photo(h, w)[..., :c].transpose(2, 0, 1)
    return pixels[None].copy()


def real(case, stored):
    """What an input file means to a float model."""
    if stored.dtype == np.uint8 and "input_scale" in case:
        return stored.astype(np.float32) * np.float32(case["input_scale"]) + np.float32(case.get("input_offset", 0.0))
    return stored


def make_inputs(case, specs, step, rng):
    """specs: [(name, dtype, shape)] in model order. Returns the arrays as stored on disk."""
    out = []
    for name, dtype, shape in specs:
        shape = [int(d) if int(d) > 0 else 1 for d in shape]
        if case["id"].startswith("silero"):
            if name == "input":
                t = np.arange(512) + 512 * step
                tone = 0.3 * np.sin(2 * np.pi * 220 * t / 16000) * (step % 2 == 0)
                out.append((tone + 0.01 * rng.standard_normal(512)).astype(np.float32)[None])
            elif name == "state":
                out.append(np.zeros([2, 1, 128], np.float32))
            elif name == "sr":
                out.append(np.array(16000, np.int64))
            continue
        if case["id"] == "ppocr-det":
            shape = [1, 3, 64, 96]
        if case["id"] == "ppocr-cls":
            shape = [1, 3, 48, 192]
        if "input_scale" in case and len(shape) == 4:
            layout = "NCHW" if shape[1] == 3 else "NHWC"
            out.append(image_input(case, shape, layout))
        elif dtype == np.int8:
            out.append(rng.integers(-128, 128, size=shape, dtype=np.int8))
        elif dtype == np.float32:
            out.append(rng.standard_normal(shape).astype(np.float32))
        else:
            raise SystemExit(f"{case['id']}: no input recipe for {name} {dtype}")
    return out


def onnx_case(case, path, refs, rng):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int8)": np.int8}
    specs = [(i.name, types[i.type], [d if isinstance(d, int) else -1 for d in i.shape]) for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    carry = case.get("carry", {})
    previous = None
    for step in range(case.get("steps", 1)):
        stored = make_inputs(case, specs, step, rng)
        if previous is not None:
            for out_name, in_name in carry.items():
                stored[[s[0] for s in specs].index(in_name)] = previous[names.index(out_name)]
        feeds = {s[0]: real(case, a) for s, a in zip(specs, stored)}
        outputs = session.run(names, feeds)
        for i, a in enumerate(stored):
            np.save(refs / f"s{step}_in{i}.npy", a)
        for i, a in enumerate(outputs):
            np.save(refs / f"s{step}_out{i}.npy", np.ascontiguousarray(a))
        previous = outputs
    return [{"name": n, "step": 0.0} for n in names]


def tflite_case(case, path, refs, rng):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    ref = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    xnn = Interpreter(model_path=str(path))
    outputs_meta = []
    for interp in (ref, xnn):
        interp.allocate_tensors()
    ins = ref.get_input_details()
    specs = [(d["name"], d["dtype"], d["shape"]) for d in ins]
    stored = make_inputs(case, specs, 0, rng)
    for i, (d, a) in enumerate(zip(ins, stored)):
        value = real(case, a)
        ref.set_tensor(d["index"], value)
        xnn.set_tensor(xnn.get_input_details()[i]["index"], value)
        np.save(refs / f"s0_in{i}.npy", a)
    ref.invoke()
    xnn.invoke()
    # For float outputs of quantized models, one step is the scale of the int8 tensor feeding the
    # DEQUANTIZE that produced them.
    producers = {}
    for op in ref._get_ops_details():
        for o in op["outputs"]:
            producers[o] = op
    details = {t["index"]: t for t in ref.get_tensor_details()}
    for i, (d, dx) in enumerate(zip(ref.get_output_details(), xnn.get_output_details())):
        r = ref.get_tensor(d["index"])
        x = xnn.get_tensor(dx["index"])
        np.save(refs / f"s0_out{i}.npy", r)
        np.save(refs / f"s0_xnn{i}.npy", x)
        step = 1.0 if r.dtype in (np.int8, np.uint8) else 0.0
        op = producers.get(d["index"])
        if r.dtype == np.float32 and op is not None and op["op_name"] == "DEQUANTIZE":
            step = float(details[op["inputs"][0]]["quantization"][0])
        deviation = np.abs(r.astype(np.float64) - x.astype(np.float64)).max()
        outputs_meta.append({"name": d["name"], "step": step, "xnnpack_max_abs": float(deviation)})
    return outputs_meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "target" / "thirdparty" / "models")
    parser.add_argument("--only", help="one case id")
    args = parser.parse_args()
    cases = tomllib.loads((HERE / "cases.toml").read_text())["case"]
    for case in cases:
        if args.only and case["id"] != args.only:
            continue
        rng = np.random.default_rng(20261123)
        refs = HERE / "refs" / case["id"]
        refs.mkdir(parents=True, exist_ok=True)
        for old in refs.glob("*.npy"):
            old.unlink()
        path = args.models / case["file"]
        meta = onnx_case(case, path, refs, rng) if path.suffix == ".onnx" else tflite_case(case, path, refs, rng)
        lines = [f"steps = {case.get('steps', 1)}", ""]
        for m in meta:
            lines.append("[[output]]")
            lines.append(f'name = "{m["name"]}"')
            lines.append(f"step = {m['step']!r}")
            if "xnnpack_max_abs" in m:
                lines.append(f"xnnpack_max_abs = {m['xnnpack_max_abs']!r}")
            lines.append("")
        (refs / "meta.toml").write_text("\n".join(lines))
        size = sum(f.stat().st_size for f in refs.iterdir())
        print(f"{case['id']}: {len(meta)} outputs, {size / 1024:.0f} KiB of references")


if __name__ == "__main__":
    main()
