"""The bundled held-out set as the agent's stdin source reads it: one JSON object per line,
{"id": "row-N", "input": [...]}. With --count, prints only the number of rows.

Plain Python (no numpy): reads the .npy header and the float32 rows itself, so the bench scripts
run with the system python3."""

import ast
import json
import struct
import sys


def rows(path):
    data = open(path, "rb").read()
    header_len = struct.unpack("<H", data[8:10])[0]
    header = ast.literal_eval(data[10:10 + header_len].decode())
    count, cols = header["shape"]
    values = struct.unpack(f"<{count * cols}f", data[10 + header_len:10 + header_len + 4 * count * cols])
    return [values[r * cols:(r + 1) * cols] for r in range(count)]


if __name__ == "__main__":
    path = "models/data/digits-test/inputs.npy"
    if "--count" in sys.argv[1:]:
        print(len(rows(path)))
    else:
        for r, values in enumerate(rows(path)):
            print(json.dumps({"id": f"row-{r}", "input": values}))
