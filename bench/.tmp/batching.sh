#!/usr/bin/env bash
# Escalator throughput with dynamic batching against the same service with max_batch 1, at the
# same verdict-latency objective (p95). Both run in this one script on the embedded broker, fed
# by the same open-loop load (simulated devices, bundled digits inputs, the bundled cloud model)
# at the same ladder of rates; each stops at the first rate it cannot answer in full within the
# objective. Throughput = the highest rate it sustained; the ratio batched / unbatched is printed.
#
#   bench/batching.sh
#   SLO_MS=20 RATES=200,400,800 SECONDS_PER_RATE=3 bench/batching.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

SLO_MS=${SLO_MS:-50}
RATES=${RATES:-250,500,1000,2000,4000,6000,8000,10000,12000,16000,20000,24000,32000,40000}
SECONDS_PER_RATE=${SECONDS_PER_RATE:-4}
MAX_BATCH=${MAX_BATCH:-32}

echo "building cloud-escalator (release)" >&2
true
ESCALATOR=${ESCALATOR:?}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

for batch in 1 "$MAX_BATCH"; do
  echo "max_batch $batch" >&2
  "$ESCALATOR" perf batching --max-batch "$batch" --rates "$RATES" --seconds "$SECONDS_PER_RATE" \
    --slo-ms "$SLO_MS" > "$dir/batch-$batch.jsonl"
done

python3 - "$dir" "$MAX_BATCH" "$SLO_MS" <<'PY'
import json, pathlib, sys
d, max_batch, slo = pathlib.Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def best(batch):
    rows = [json.loads(l) for l in (d / f"batch-{batch}.jsonl").read_text().splitlines()]
    ok = [r for r in rows if r["meets_slo"]]
    return max(ok, key=lambda r: r["answered_per_s"]) if ok else None
one, many = best(1), best(max_batch)
print(f"objective: every escalation answered, verdict latency p95 <= {slo:g} ms")
for name, r in ((f"max_batch 1", one), (f"max_batch {max_batch}", many)):
    if r is None:
        print(f"{name:<14} met the objective at no offered rate")
    else:
        print(f"{name:<14} {r['answered_per_s']:>8.0f} escalations/s  (p95 {r['latency']['p95_us']/1000:.1f} ms, mean batch {r['mean_batch']:.1f})")
if one and many:
    print(f"ratio          {many['answered_per_s'] / one['answered_per_s']:.2f}x   (goal >= 3.7x)")
PY
