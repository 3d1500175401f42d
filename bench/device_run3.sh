#!/usr/bin/env bash
# Third GPU session (split master weights, 8-wide elementwise kernels, recompute modes): GPU tests,
# exact resume in bf16, then the Llama-3.2-1B FLAN-like side by side with HF (flatten, bf16 and
# fp32-state autocast) for nopad with --recompute none and mlp, each with an op profile.
# Usage (on the GPU host, from the repo root): bench/device_run3.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 120 $d/cuda_ops --test-threads=1 2>&1
  timeout 90 $d/cuda_model --test-threads=1 --nocapture 2>&1
} > "$out/tests.log"
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.log"
# Exact resume with split master weights: 30 steps straight vs 15 + resume.
r="$d/nopad train --device cuda --model small --data synthetic-flan --steps 30 --log-every 1 --no-progress"
{ $r --out /tmp/ra --log /tmp/ra.jsonl && $r --out /tmp/rb --log /tmp/rb.jsonl --save-every 15 --stop-after 15 \
  && $r --out /tmp/rb --log /tmp/rb.jsonl --resume latest; } > "$out/resume.log" 2>&1
python3 - <<'PY' | tee -a "$out/resume.log"
import json
a=[json.loads(l) for l in open('/tmp/ra.jsonl')]; b=[json.loads(l) for l in open('/tmp/rb.jsonl')]
a=[x for x in a if 'loss' in x and 'step' in x]; b=[x for x in b if 'loss' in x and 'step' in x]
same=sum(1 for x,y in zip(a,b) if x['loss']==y['loss'])
print(f"resume: {len(a)} vs {len(b)} logged steps, {same} with bit-identical loss; max |dloss| {max(abs(x['loss']-y['loss']) for x,y in zip(a,b)):.3e}")
PY
HF_MODES="flatten flatten-amp" timeout 200 bench/side_by_side.sh $d/nopad /tmp/flan3 --model llama-3.2-1b --data synthetic-flan \
  --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20 --profile-steps 3 > "$out/flan3.log" 2>&1
timeout 80 $d/nopad bench --device cuda --recompute mlp --out /tmp/flan3mlp --model llama-3.2-1b --data synthetic-flan \
  --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20 --profile-steps 3 > "$out/flan3mlp.log" 2>&1
python3 bench/compare.py /tmp/flan3mlp/results.json /tmp/flan3/hf-pad.json /tmp/flan3/hf-flatten.json > /tmp/flan3mlp/compare.txt 2>&1
tar czf "$out/results3.tgz" --exclude=export/model -C /tmp flan3 flan3mlp 2>/dev/null
for f in flan3 flan3mlp; do echo "== $f"; grep -v "step [0-9]*/" "$out/$f.log" | tr '\r' '\n' | grep -v "step [0-9]*/" | tail -30; cat /tmp/$f/compare.txt; done
