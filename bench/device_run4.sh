#!/usr/bin/env bash
# Fourth GPU session: GPU tests (three CUDA modes incl. bf16 gradients), GEMM plan costs, exact
# resume in bf16 (deterministic embedding backward), then the Llama-3.2-1B FLAN-like side by side
# with HF (flatten bf16, and fp32 states under autocast) for nopad variants: default; bf16
# gradients; --recompute mlp with bf16 gradients; default with exact GEMM plans (before this
# session's plan cache). Usage (GPU host, repo root): bench/device_run4.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 150 $d/cuda_ops --test-threads=1 2>&1
  timeout 90 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 60 $d/cuda_ops --ignored bench_llama_1b_shapes --nocapture 2>&1
} > "$out/tests.log"
grep -E "test result|FAILED|panicked|worst|loss cpu|gemm plan" "$out/tests.log"
r="$d/nopad train --device cuda --model small --data synthetic-flan --steps 30 --log-every 1 --no-progress"
{ $r --out /tmp/ra --log /tmp/ra.jsonl && $r --out /tmp/rb --log /tmp/rb.jsonl --save-every 15 --stop-after 15 \
  && $r --out /tmp/rb --log /tmp/rb.jsonl --resume latest; } > "$out/resume.log" 2>&1
python3 - <<'PY' | tee -a "$out/resume.log"
import json
a=[json.loads(l) for l in open('/tmp/ra.jsonl')]; b=[json.loads(l) for l in open('/tmp/rb.jsonl')]
a=[x for x in a if 'loss' in x and 'step' in x]; b=[x for x in b if 'loss' in x and 'step' in x]
same=sum(1 for x,y in zip(a,b) if x['loss']==y['loss'] and x['grad_norm']==y['grad_norm'])
print(f"resume: {len(a)} vs {len(b)} logged steps, {same} with bit-identical loss and grad norm; max |dloss| {max(abs(x['loss']-y['loss']) for x,y in zip(a,b)):.3e}")
PY
common="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES="flatten flatten-amp" timeout 200 bench/side_by_side.sh $d/nopad /tmp/f4 $common --profile-steps 3 > "$out/f4.log" 2>&1
variant() {  # name, env, flags...
  local name=$1 envs=$2; shift 2
  env $envs timeout 90 $d/nopad bench --device cuda --out /tmp/$name $common "$@" > "$out/$name.log" 2>&1
  python3 bench/compare.py /tmp/$name/results.json /tmp/f4/hf-pad.json /tmp/f4/hf-flatten.json > /tmp/$name/compare.txt 2>&1
  python3 bench/compare.py /tmp/$name/results.json /tmp/f4/hf-pad.json /tmp/f4/hf-flatten-amp.json | sed 's/^flatten /amp     /' >> /tmp/$name/compare.txt 2>&1
}
variant f4g16 "X=1" --grad-dtype bf16 --profile-steps 3
variant f4mlpg16 "X=1" --grad-dtype bf16 --recompute mlp
variant f4exact "NOPAD_GEMM_PLANS=exact"
variant f4mlp "X=1" --recompute mlp
tar czf "$out/results4.tgz" --exclude=export/model -C /tmp f4 f4g16 f4mlpg16 f4exact f4mlp 2>/dev/null
for f in f4 f4g16 f4mlpg16 f4exact f4mlp; do echo "== $f"; grep -v "step [0-9]*/" "$out/$f.log" | tr '\r' '\n' | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|^  [a-z_+ ]+ +[0-9.]+ ms" | head -30; cat /tmp/$f/compare.txt; done
