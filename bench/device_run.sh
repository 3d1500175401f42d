#!/usr/bin/env bash
# The GPU session behind docs/BENCHMARKS.md: GPU tests, then the side-by-side benchmarks against
# HF Transformers. Binaries are built on the build machine and carried in .device/gpu (nopad,
# and the test executables cuda_ops, cuda_model, flash_gpu_test).
# Usage (on the GPU host, from the repo root): bench/device_run.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
# 1. GPU tests: every op and the whole model against the CPU backend, the flash kernels.
{
  timeout 100 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 40 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
} > "$out/tests.log"
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.log"
# 2. Llama-3.2-1B shape, FLAN-like lengths, 16 examples per step: nopad (flatten, pad; with an
#    op-by-op profile of 3 extra steps) vs HF (pad, flatten, flatten with fp32 states) + parity.
timeout 230 bench/side_by_side.sh $d/nopad /tmp/flan --model llama-3.2-1b --data synthetic-flan \
  --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 20 --profile-steps 3 > "$out/flan.log" 2>&1
cat /tmp/flan/compare.txt 2>/dev/null
# 3. Llama-2-7B shape cut to 8 layers (1.88B), FLAN-like, 16 examples per step: nopad vs HF flatten.
HF_MODES=flatten timeout 130 bench/side_by_side.sh $d/nopad /tmp/l2 --model llama-2-7b --layers 8 --data synthetic-flan \
  --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 12 > "$out/l2.log" 2>&1
cat /tmp/l2/compare.txt 2>/dev/null
# 3b. The same 8-layer Llama-2-7B shape, OrcaMath-like lengths, 8 examples per step.
HF_MODES=flatten timeout 130 bench/side_by_side.sh $d/nopad /tmp/l2orca --model llama-2-7b --layers 8 --data synthetic-orcamath \
  --examples 800 --batch-size 8 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 12 > "$out/l2orca.log" 2>&1
cat /tmp/l2orca/compare.txt 2>/dev/null
# 4. Llama-3.2-1B, OrcaMath-like lengths, 8 examples per step: nopad vs HF flatten.
HF_MODES=flatten timeout 110 bench/side_by_side.sh $d/nopad /tmp/orca --model llama-3.2-1b --data synthetic-orcamath \
  --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 15 > "$out/orca.log" 2>&1
cat /tmp/orca/compare.txt 2>/dev/null
# 5. The strategies that change the rows: concat and offline (4 rows of 4096 per step) beside flatten.
timeout 90 $d/nopad bench --device cuda --model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 4 \
  --max-len 4096 --strategies flatten,concat,offline --warmup 2 --steps 8 --out /tmp/rows > "$out/rows.log" 2>&1
tar czf "$out/results.tgz" --exclude=export/model -C /tmp flan l2 l2orca orca rows 2>/dev/null
for f in flan l2 l2orca orca rows; do echo "== $f"; grep -v "step [0-9]*/" "$out/$f.log" | tr '\r' '\n' | grep -v "step [0-9]*/" | tail -32; done
