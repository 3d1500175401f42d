#!/usr/bin/env bash
# Loss check at the Llama-2-7B shape (8 layers, head_dim 128, untied head, V = 32000) against HF
# at nopad's optimizer precision (fp32 weights and states, bf16 autocast, FA2 varlen): run 5's
# bf16 HF run parted from nopad there, and bf16 HF parameters drop small updates.
# Usage: bench/device_run7.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
HF_MODES=flatten-amp timeout 200 bench/side_by_side.sh $d/nopad /tmp/l7 --model llama-2-7b --layers 8 --data synthetic-flan \
  --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "$out/l7.txt" 2>&1
python3 - <<'PY' | tee "$out/l7-losses.txt"
import json
r=json.load(open('/tmp/l7/results.json'))['results'][0]; h=json.load(open('/tmp/l7/hf-flatten-amp.json'))
print('nopad', [round(x,4) for x in r['losses']]); print('hf amp', [round(x,4) for x in h['losses']])
d=[abs(a-b) for a,b in zip(r['losses'],h['losses'])]
print(f"max |dloss| {max(d):.3e} (step {d.index(max(d))+1}), last {d[-1]:.3e}; nopad {r['tokens_per_s']:.0f} tok/s {r['peak_memory_bytes']/2**30:.2f} GiB, HF amp {h['tokens_per_s']:.0f} tok/s {h['peak_memory_bytes']/2**30:.2f} GiB")
PY
