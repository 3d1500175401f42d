#!/usr/bin/env bash
# Thirteenth call (2026-11-29, third session, last seconds of device time): the per-op profile
# timed by CUDA events (no synchronisation per op) on the 1B FLAN-like row.
# Usage (GPU host, repo root): bench/device_run13.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache
mkdir -p "$out"; date -u > "$out/env.txt"
timeout 150 $d/nopad bench --device cuda --out /tmp/p13 --model llama-3.2-1b --data synthetic-flan --examples 2000 \
  --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 6 --profile-steps 3 > "$out/p13.txt" 2>&1
tr '\r' '\n' < "$out/p13.txt" | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|^  [a-z_+ ]+ +[0-9.]+ ms"
echo "done at ${SECONDS}s"
