#!/usr/bin/env bash
# Sixteenth call (2026-11-29, fourth session): the one-pass rmsnorm backward. GPU tests
# (cuda_ops against the CPU, new 4096- and 2056-wide cases; cuda_model), then the 1B FLAN-like
# profile A/B/A against run 14's binary (9081d9a) and the 7B shape (4096 wide) A/B.
# Usage (GPU host, repo root): bench/device_run16.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu|rmsnorm" "$out/tests.txt" | head -20
echo "tests done at ${SECONDS}s"
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 --profile-steps 3"
c7="--model llama-2-7b --layers 8 --data synthetic-flan --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 8 --profile-steps 2"
ab() {  # name, binary, config
  timeout 90 $d/$2 bench --device cuda --out /tmp/$1 $3 > /tmp/logs/$1.txt 2>&1
  echo "== $1 ($2) at ${SECONDS}s"
  tr '\r' '\n' < /tmp/logs/$1.txt | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|rmsnorm" | head -6
}
ab n16a nopad "$c1"; ab p16 nopad_prev "$c1"; ab n16b nopad "$c1"
ab n16l nopad "$c7"; ab p16l nopad_prev "$c7"
tar czf "$out/logs16.tgz" -C /tmp logs
echo "all done at ${SECONDS}s"
