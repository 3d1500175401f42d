#!/usr/bin/env bash
# Both issue-6 targets in one configuration? 1B FLAN-like side by side with HF flatten, nopad with
# bf16 gradients and the MLP of the first K layers recomputed (K = 8, 10, 12); and the model test
# of partial MLP recomputation. Usage: bench/device_run8.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
timeout 40 $d/cuda_model --test-threads=1 --nocapture 2>&1 | grep -E "test result|FAILED|panicked|worst|loss cpu" > "$out/tests.txt"
cat "$out/tests.txt"
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/k10 $c1 --grad-dtype bf16 --recompute mlp:10 > /tmp/k10.log 2>&1
for k in 8 12; do
  timeout 50 $d/nopad bench --device cuda --out /tmp/k$k $c1 --grad-dtype bf16 --recompute mlp:$k > /tmp/k$k.log 2>&1
done
for k in 8 10 12; do echo "== mlp:$k"; python3 bench/compare.py /tmp/k$k/results.json /tmp/k10/hf-pad.json /tmp/k10/hf-flatten.json; done | tee "$out/compare.txt"
