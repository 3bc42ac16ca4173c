#!/usr/bin/env python3
"""Make testdata/digits-edge.unsure.onnx: the float edge model with its logits scaled by 0.2.

Same argmax (so the same answers), much lower confidence: at a max-probability threshold of 0.9
it escalates several times more inputs than the original. It stands for a bad retrain in the OTA
health-watch test (tests/tests/ota.rs), which must roll it back.

    /tmp/gen/bin/python models/unsure.py     # needs numpy and onnx; rewrites manifest.toml
"""

import shutil

import onnx
from onnx import numpy_helper

from manifest import HERE, write_manifest

SCALE = 0.2


def main():
    model = onnx.load(HERE / "digits-edge.f32.onnx")
    for init in model.graph.initializer:
        if init.name in ("w2", "b2"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * SCALE, init.name))
    out = HERE / "testdata" / "digits-edge.unsure.onnx"
    onnx.save(model, out)
    shutil.copy(HERE / "digits-edge.f32.onnx.toml", str(out) + ".toml")
    write_manifest()


if __name__ == "__main__":
    main()
