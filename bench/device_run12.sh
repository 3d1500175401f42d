#!/usr/bin/env bash
# Twelfth GPU session call (2026-11-29, third session): the 7B-shape row against HF at nopad's
# optimizer precision (fp32 weights and states, bf16 autocast), with nopad's current defaults.
# Usage (GPU host, repo root): bench/device_run12.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
date -u > "$out/env.txt"
HF_MODES=flatten-amp timeout 300 bench/side_by_side.sh $d/nopad /tmp/l12 --model llama-2-7b --layers 8 --data synthetic-flan \
  --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "$out/l12.txt" 2>&1
tr '\r' '\n' < "$out/l12.txt" | grep -E "^ flatten" | head -2
python3 bench/compare.py /tmp/l12/results.json /tmp/l12/none.json /tmp/l12/hf-flatten-amp.json | tee "$out/compare.txt"
python3 - <<'PY' | tee -a "$out/compare.txt"
import json
n=json.load(open('/tmp/l12/results.json'))['results'][0]; h=json.load(open('/tmp/l12/hf-flatten-amp.json'))
d=[abs(a-b) for a,b in zip(n['losses'],h['losses'])]
print("nopad losses", [round(x,4) for x in n['losses']]); print("HF amp losses", [round(x,4) for x in h['losses']])
print(f"max |dloss| {max(d):.4f} at step {d.index(max(d))+1}, last {d[-1]:.4f}; nopad {n['tokens_per_s']:.0f} tok/s {n['peak_memory_bytes']/2**30:.2f} GiB, HF amp {h['tokens_per_s']:.0f} tok/s {h['peak_memory_bytes']/2**30:.2f} GiB")
PY
echo "done at ${SECONDS}s"
