#!/usr/bin/env bash
# Tenth GPU session (2026-11-29, third session): the defaults after run 9 (--grad-dtype auto =
# bf16 for one micro-batch per step, gradients over dead activations, dlogits in place, cached
# blocks released as activations grow). GPU tests, exact resume, then side by side with HF:
# 1B FLAN-like (HF flatten bf16 and fp32-state autocast), 1B OrcaMath-like (+ partial MLP
# recomputation), Llama-2-7B cut to 8 layers (FLAN-like, OrcaMath-like).
# Usage (GPU host, repo root): bench/device_run10.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs   # at most 8 files come back: the run logs travel inside results10.tgz
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.txt"
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
echo "tests and resume done at ${SECONDS}s"
save() { tar czf "$out/results10.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f10* o10* l10 lo10 2>/dev/null) 2>/dev/null; }
show() { tr '\r' '\n' < "/tmp/logs/$1.txt" | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|profiled|^  [a-z_+ ]+ +[0-9.]+ ms" | head -30; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES="flatten flatten-amp" timeout 200 bench/side_by_side.sh $d/nopad /tmp/f10 $c1 --profile-steps 3 > "/tmp/logs/f10.txt" 2>&1
echo "== f10 (1B FLAN, defaults) at ${SECONDS}s"; show f10; save
c2="--model llama-3.2-1b --data synthetic-orcamath --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15"
HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/o10 $c2 > "/tmp/logs/o10.txt" 2>&1
echo "== o10 (1B OrcaMath, defaults) at ${SECONDS}s"; show o10; save
for k in 3 4; do
  timeout 45 $d/nopad bench --device cuda --out /tmp/o10k$k $c2 --recompute mlp:$k > "/tmp/logs/o10k$k.txt" 2>&1
  python3 bench/compare.py /tmp/o10k$k/results.json /tmp/o10/hf-pad.json /tmp/o10/hf-flatten.json > /tmp/o10k$k/compare.txt 2>&1
  echo "== o10k$k (--recompute mlp:$k) at ${SECONDS}s"; show o10k$k; save
done
if [ $SECONDS -lt 420 ]; then
  HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/l10 --model llama-2-7b --layers 8 --data synthetic-flan \
    --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 --profile-steps 2 > "/tmp/logs/l10.txt" 2>&1
  echo "== l10 (7B shape FLAN, defaults) at ${SECONDS}s"; show l10; save
fi
if [ $SECONDS -lt 480 ]; then
  HF_MODES=flatten timeout 110 bench/side_by_side.sh $d/nopad /tmp/lo10 --model llama-2-7b --layers 8 --data synthetic-orcamath \
    --examples 800 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "/tmp/logs/lo10.txt" 2>&1
  echo "== lo10 (7B shape OrcaMath, defaults) at ${SECONDS}s"; show lo10; save
fi
echo "all done at ${SECONDS}s"
