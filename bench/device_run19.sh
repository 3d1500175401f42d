#!/usr/bin/env bash
# Nineteenth call (2026-11-29, fifth session): commit after 2035a54 routing every key tile of the
# Dh-64 deterministic backward to the 64-key kernel (bwd_wgs_kv_64 on the H200). The flash GPU
# test; flash-check on the Dh-64 check shapes with long sequences; c and d_500 d64 bench-only with
# the default, long_det=split (run 18's routing), the default again; the 1B FLAN-like row side by
# side with HF flatten + FA2 varlen (+ profile).
# Usage (GPU host, repo root): bench/device_run19.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 60 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
  timeout 90 $d/flash-check --seed 1129919 --skip-bench --only lens_d64,lognormal8k_d64,500xU8-256_d64 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|^FAIL|failures|skipped" "$out/tests.txt"; echo "flash-check PASS lines: $(grep -c '^PASS' "$out/tests.txt")"
echo "tests done at ${SECONDS}s"
var() {  # name, FLASH_BWD
  FLASH_BWD="$2" timeout 45 $d/flash-check --seed 1129919 --skip-check --reps 10 --bench-only c_,d_500xU8-256_d64 > /tmp/logs/var_$1.txt 2>&1
  echo "var $1 rc=$? at ${SECONDS}s"; grep -E "^[a-e]_" /tmp/logs/var_$1.txt | awk '{printf "  %-24s auto %6s det %6s\n", $1, $15, $19}'
}
var def ""
var split "long_det=split"
var def2 ""
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES=flatten timeout 150 bench/side_by_side.sh $d/nopad /tmp/f19 $c1 --profile-steps 3 > "/tmp/logs/f19.txt" 2>&1
echo "== f19 (1B FLAN) at ${SECONDS}s"; tr '\r' '\n' < /tmp/logs/f19.txt | grep -v "step [0-9]*/" | grep -E "^ flatten|profiled|attention" | head -6; cat /tmp/f19/compare.txt 2>/dev/null
tar czf "$out/results19.tgz" --exclude=export/model -C /tmp logs f19 2>/dev/null
echo "all done at ${SECONDS}s"
