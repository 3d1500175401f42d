#!/usr/bin/env bash
# Fourteenth call (2026-11-29, fourth session): GPU tests of the staging pool (tile-list uploads
# from reused page-locked buffers) and of the simple-kernel list built only on its own path;
# flash-check with a fresh seed; the 1B FLAN-like bench with this binary and run 13's (A/B/A);
# an nsys trace of this binary: device time per kernel and where the GPU waits for the host.
# Usage (GPU host, repo root): bench/device_run14.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; command -v nsys ncu; } > "$out/env.txt" 2>&1
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_lib_test --test-threads=1 --nocapture 2>&1
  timeout 120 $d/flash-check --seed 1129714 --skip-bench 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu|^FAIL|failures|skipped" "$out/tests.txt"; echo "flash-check PASS lines: $(grep -c '^PASS' "$out/tests.txt")"
echo "tests done at ${SECONDS}s"
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 --profile-steps 3"
ab() {  # name, binary
  timeout 70 $d/$2 bench --device cuda --out /tmp/$1 $c1 > /tmp/logs/$1.txt 2>&1
  echo "== $1 ($2) at ${SECONDS}s"
  tr '\r' '\n' < /tmp/logs/$1.txt | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|attention" | head -6
}
ab n14a nopad; ab p14 nopad_prev; ab n14b nopad
if command -v nsys >/dev/null && [ $SECONDS -lt 400 ]; then
  timeout 100 nsys profile --trace=cuda --sample=none --cpuctxsw=none -o /tmp/ns14 -f true \
    $d/nopad bench --device cuda --out /tmp/ns14b --model llama-3.2-1b --data synthetic-flan --examples 2000 \
    --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 6 > /tmp/logs/nsys.txt 2>&1
  echo "nsys rc=$? at ${SECONDS}s"
  timeout 60 nsys stats --format csv -r cuda_gpu_trace -o /tmp/ns14 /tmp/ns14.nsys-rep > /dev/null 2>&1
  ls /tmp/ns14* >> /tmp/logs/nsys.txt
  f=$(ls /tmp/ns14*gpu_trace*.csv 2>/dev/null | head -1)
  [ -n "$f" ] && python3 bench/nsys_gaps.py "$f" 0.6 | tee "$out/nsys_gaps.txt"
  timeout 40 nsys stats -r cuda_api_sum /tmp/ns14.nsys-rep 2>/dev/null | head -30 > "$out/nsys_api.txt"
fi
tar czf "$out/logs14.tgz" -C /tmp logs
echo "all done at ${SECONDS}s"
