#!/usr/bin/env bash
# Ninth GPU session (2026-11-29, third session): gradients overwritten by a step's first
# micro-batch and placed over dead activations (`set_grad_aliasing`). GPU tests (the ops' write
# modes, the whole model with aliasing), exact resume, then 1B FLAN-like side by side with HF
# flatten (+ checkpoint parity, which runs `nopad eval` on CUDA), with A/B variants in the same
# call; OrcaMath-like last if time is left. Usage (GPU host, repo root): bench/device_run9.sh OUT
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs   # at most 8 files come back: the run logs travel inside results9.tgz
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.txt"
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
echo "resume done at ${SECONDS}s"
save() { tar czf "$out/results9.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f9* o9 2>/dev/null) 2>/dev/null; }
show() { tr '\r' '\n' < "/tmp/logs/$1.txt" | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|profiled|^  [a-z_+ ]+ +[0-9.]+ ms" | head -30; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES="flatten parity" timeout 170 bench/side_by_side.sh $d/nopad /tmp/f9 $c1 --grad-dtype bf16 --profile-steps 3 > "/tmp/logs/f9.txt" 2>&1
echo "== f9 (bf16 gradients, aliased) at ${SECONDS}s"; show f9; save
variant() {  # name, flags...
  local name=$1; shift
  timeout 60 $d/nopad bench --device cuda --out /tmp/$name $c1 "$@" > "/tmp/logs/$name.txt" 2>&1
  python3 bench/compare.py /tmp/$name/results.json /tmp/f9/hf-pad.json /tmp/f9/hf-flatten.json > /tmp/$name/compare.txt 2>&1
  echo "== $name ($*) at ${SECONDS}s"; show $name; save
}
variant f9noalias --grad-dtype bf16 --no-grad-aliasing
variant f9f32 --profile-steps 3
variant f9mlp2 --grad-dtype bf16 --recompute mlp:2
if [ $SECONDS -lt 430 ]; then
  HF_MODES=flatten timeout 130 bench/side_by_side.sh $d/nopad /tmp/o9 --model llama-3.2-1b --data synthetic-orcamath \
    --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15 --grad-dtype bf16 > "/tmp/logs/o9.txt" 2>&1
  echo "== o9 (OrcaMath, bf16 gradients) at ${SECONDS}s"; show o9; save
fi
echo "all done at ${SECONDS}s"
