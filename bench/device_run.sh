#!/usr/bin/env bash
# The GPU session behind docs/BENCHMARKS.md: GPU tests, then the side-by-side benchmark against
# HF Transformers on the Llama-3.2-1B shape. Binaries are built on the build machine and carried
# in .device/gpu (nopad, and the test executables cuda_ops, cuda_model, flash_gpu_test).
# Usage (on the GPU host, from the repo root): bench/device_run.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git log -1 --format='commit %H' 2>/dev/null; } > "$out/env.txt"
# 1. GPU tests: every op and the whole model against the CPU backend, the flash kernels.
{
  timeout 150 $d/cuda_ops --test-threads=1 2>&1
  timeout 120 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
} > "$out/tests.log"
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.log"
# 2. Llama-3.2-1B shape, FLAN-like lengths, 16 examples per step: nopad (flatten, pad) vs HF.
timeout 330 bench/side_by_side.sh $d/nopad /tmp/flan --model llama-3.2-1b --data synthetic-flan \
  --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 20 > "$out/flan.log" 2>&1
cat /tmp/flan/compare.txt 2>/dev/null
# 3. The same shape, OrcaMath-like lengths, 8 examples per step, nopad only (time permitting).
timeout 120 $d/nopad bench --device cuda --model llama-3.2-1b --data synthetic-orcamath --examples 1000 \
  --batch-size 8 --max-len 4096 --strategies flatten,pad --warmup 3 --steps 15 --out /tmp/orca > "$out/orca.log" 2>&1
tar czf "$out/results.tgz" --exclude=export/model -C /tmp flan orca 2>/dev/null
tail -5 "$out/flan.log"; tail -6 "$out/orca.log"
