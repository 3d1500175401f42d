#!/usr/bin/env bash
# Fifth GPU session (final of 2026-11-29): GPU tests in three CUDA modes, exact resume, then side
# by side with HF Transformers: Llama-3.2-1B FLAN-like (HF flatten bf16 and fp32-state autocast;
# nopad default, bf16 gradients, and --recompute mlp with bf16 gradients), then HF flatten vs
# nopad on Llama-2-7B cut to 8 layers (FLAN-like and OrcaMath-like) and Llama-3.2-1B
# OrcaMath-like. Usage (GPU host, repo root): bench/device_run5.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs   # at most 8 files come back: the run logs travel inside results5.tgz
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 100 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 40 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
  timeout 40 $d/cuda_ops --ignored bench_llama_1b_shapes --nocapture 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu|gemm plan" "$out/tests.txt"
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
save() { tar czf "$out/results5.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f5* l5 o5 lo5 2>/dev/null) 2>/dev/null; }
show() { grep -v "step [0-9]*/" "/tmp/logs/$1.txt" | tr '\r' '\n' | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|profiled|^  [a-z_+ ]+ +[0-9.]+ ms" | head -28; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES="flatten flatten-amp" timeout 170 bench/side_by_side.sh $d/nopad /tmp/f5 $c1 --profile-steps 3 > "/tmp/logs/f5.txt" 2>&1
echo "== f5"; show f5; save
variant() {  # name, flags...
  local name=$1; shift
  timeout 60 $d/nopad bench --device cuda --out /tmp/$name $c1 "$@" > "/tmp/logs/$name.txt" 2>&1
  { python3 bench/compare.py /tmp/$name/results.json /tmp/f5/hf-pad.json /tmp/f5/hf-flatten.json
    python3 bench/compare.py /tmp/$name/results.json /tmp/f5/hf-pad.json /tmp/f5/hf-flatten-amp.json | sed 's/^flatten /amp     /; s/HF flatten + FA2 varlen/HF flatten + FA2 varlen, fp32 states (amp)/'; } > /tmp/$name/compare.txt 2>&1
  echo "== $name"; show $name; save
}
variant f5g16 --grad-dtype bf16 --profile-steps 3
variant f5mlpg16 --grad-dtype bf16 --recompute mlp
HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/l5 --model llama-2-7b --layers 8 --data synthetic-flan \
  --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "/tmp/logs/l5.txt" 2>&1
echo "== l5"; show l5; save
HF_MODES=flatten timeout 100 bench/side_by_side.sh $d/nopad /tmp/o5 --model llama-3.2-1b --data synthetic-orcamath \
  --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15 > "/tmp/logs/o5.txt" 2>&1
echo "== o5"; show o5; save
HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/lo5 --model llama-2-7b --layers 8 --data synthetic-orcamath \
  --examples 800 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "/tmp/logs/lo5.txt" 2>&1
echo "== lo5"; show lo5; save
