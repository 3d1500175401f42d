#!/usr/bin/env bash
# Eighteenth call (2026-11-29, fifth session): the session's final binary (commit 7145ee2: the
# wgmma attention kernels of nopad-flash runs 7a-7d are the defaults on the H200): every GPU test
# of the backend, model and flash crates, then the 1B FLAN-like (+ profile) and 7B-shape rows side
# by side with HF flatten + FA2 varlen in the same call, then exact resume if time is left.
# Usage (GPU host, repo root): bench/device_run18.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_lib_test --test-threads=1 --nocapture 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|loss cpu|skipped" "$out/tests.txt"
echo "tests done at ${SECONDS}s"
save() { tar czf "$out/results18.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f18 l18 2>/dev/null) 2>/dev/null; }
show() { tr '\r' '\n' < "/tmp/logs/$1.txt" | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|profiled|attention" | head -8; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES=flatten timeout 150 bench/side_by_side.sh $d/nopad /tmp/f18 $c1 --profile-steps 3 > "/tmp/logs/f18.txt" 2>&1
echo "== f18 (1B FLAN) at ${SECONDS}s"; show f18; save
if [ $SECONDS -lt 380 ]; then
  HF_MODES=flatten timeout 130 bench/side_by_side.sh $d/nopad /tmp/l18 --model llama-2-7b --layers 8 --data synthetic-flan \
    --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "/tmp/logs/l18.txt" 2>&1
  echo "== l18 (7B shape FLAN) at ${SECONDS}s"; show l18; save
fi
if [ $SECONDS -lt 500 ]; then
  r="$d/nopad train --device cuda --model small --data synthetic-flan --steps 30 --log-every 1 --no-progress"
  { $r --out /tmp/ra --log /tmp/ra.jsonl && $r --out /tmp/rb --log /tmp/rb.jsonl --save-every 15 --stop-after 15 \
    && $r --out /tmp/rb --log /tmp/rb.jsonl --resume latest; } > "$out/resume.txt" 2>&1
  python3 - <<'PY' | tee -a "$out/resume.txt"
import json
a=[json.loads(l) for l in open('/tmp/ra.jsonl')]; b=[json.loads(l) for l in open('/tmp/rb.jsonl')]
a=[x for x in a if 'loss' in x and 'step' in x]; b=[x for x in b if 'loss' in x and 'step' in x]
same=sum(1 for x,y in zip(a,b) if x['loss']==y['loss'] and x['grad_norm']==y['grad_norm'])
print(f"resume: {len(a)} vs {len(b)} logged steps, {same} with bit-identical loss and grad norm; max |dloss| {max(abs(x['loss']-y['loss']) for x,y in zip(a,b)):.3e}")
PY
fi
echo "all done at ${SECONDS}s"
