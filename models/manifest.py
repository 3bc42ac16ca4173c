"""The sha256 manifest of every generated model file, shared by the model generators."""

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_manifest():
    files = sorted(
        p for p in HERE.rglob("*") if p.is_file() and (p.suffix in {".onnx", ".tflite", ".npy", ".png"} or p.name.endswith((".onnx.toml", ".tflite.toml")) or p.name == "steps.toml")
        and "thirdparty" not in p.parts
    )
    lines = [
        "# sha256 of every generated file, checked by CI (shared/infer/tests/bundled.rs).",
        "# Regenerate with models/generate.py and models/motion.py, which rewrite this file.",
        "",
    ]
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        lines.append(f'"{p.relative_to(HERE).as_posix()}" = "{digest}"')
    (HERE / "manifest.toml").write_text("\n".join(lines) + "\n")
