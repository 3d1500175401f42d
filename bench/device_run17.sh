#!/usr/bin/env bash
# Seventeenth call (2026-11-29, fourth session, last): the session's final binary (commit
# 92d6313: staging pool, one-pass rmsnorm backward for rows <= 2048): every GPU test, flash-check
# with a fresh seed, exact resume, and the 1B FLAN-like and 7B-shape benches (nopad alone).
# Usage (GPU host, repo root): bench/device_run17.sh OUT_DIR
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
  timeout 120 $d/flash-check --seed 1129917 --skip-bench 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|loss cpu|^FAIL|failures|skipped" "$out/tests.txt"; echo "flash-check PASS lines: $(grep -c '^PASS' "$out/tests.txt")"
echo "tests done at ${SECONDS}s"
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
for c in "f17 --model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --warmup 3 --steps 12 --profile-steps 3" \
         "l17 --model llama-2-7b --layers 8 --data synthetic-flan --examples 1500 --batch-size 16 --max-len 4096 --warmup 3 --steps 8"; do
  set -- $c; name=$1; shift
  timeout 90 $d/nopad bench --device cuda --out /tmp/$name --strategies flatten "$@" > /tmp/logs/$name.txt 2>&1
  echo "== $name at ${SECONDS}s"; tr '\r' '\n' < /tmp/logs/$name.txt | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|rmsnorm bwd|attention" | head -6
done
tar czf "$out/logs17.tgz" -C /tmp logs
echo "all done at ${SECONDS}s"
