#!/usr/bin/env bash
# Eleventh GPU session (2026-11-29, third session, last call): nopad-flash run 5a's kernels merged
# (D fused into the dQ kernel, Dh-128 forward at 4 CTAs/SM, V0 prefetch, FA2-layout long backward
# for the atomic mode). GPU tests, flash-check with a fresh seed, then the 1B rows side by side
# with HF flatten, each also with the previous binary (run 10's kernels) in the same call.
# Usage (GPU host, repo root): bench/device_run11.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
{
  timeout 110 $d/cuda_ops --test-threads=1 2>&1
  timeout 60 $d/cuda_model --test-threads=1 --nocapture 2>&1
  timeout 60 $d/flash_gpu_test --test-threads=1 --nocapture 2>&1
  timeout 120 $d/flash-check --seed 1129611 --skip-bench 2>&1
} > "$out/tests.txt"
grep -E "test result|FAILED|panicked|worst|loss cpu|^FAIL|failures" "$out/tests.txt"; echo "flash-check PASS lines: $(grep -c '^PASS' "$out/tests.txt")"
echo "tests done at ${SECONDS}s"
save() { tar czf "$out/results11.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f11* o11* 2>/dev/null) 2>/dev/null; }
show() { tr '\r' '\n' < "/tmp/logs/$1.txt" | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|attention|profiled" | head -8; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
c2="--model llama-3.2-1b --data synthetic-orcamath --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15"
HF_MODES=flatten timeout 150 bench/side_by_side.sh $d/nopad /tmp/f11 $c1 --profile-steps 3 > "/tmp/logs/f11.txt" 2>&1
echo "== f11 (1B FLAN, merged kernels) at ${SECONDS}s"; show f11; save
prev() {  # name, config of the row it repeats with run 10's binary
  local name=$1 base=$2; shift 2
  timeout 60 $d/nopad_prev bench --device cuda --out /tmp/$name "$@" > "/tmp/logs/$name.txt" 2>&1
  python3 bench/compare.py /tmp/$name/results.json /tmp/$base/hf-pad.json /tmp/$base/hf-flatten.json > /tmp/$name/compare.txt 2>&1
  echo "== $name (previous binary) at ${SECONDS}s"; show $name; save
}
prev f11prev f11 $c1 --profile-steps 3
if [ $SECONDS -lt 330 ]; then
  HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/o11 $c2 > "/tmp/logs/o11.txt" 2>&1
  echo "== o11 (1B OrcaMath, merged kernels) at ${SECONDS}s"; show o11; save
  [ $SECONDS -lt 440 ] && prev o11prev o11 $c2
fi
echo "all done at ${SECONDS}s"
