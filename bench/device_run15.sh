#!/usr/bin/env bash
# Fifteenth call (2026-11-29, fourth session): the headline rows again with run 14's binary
# (commit 9081d9a: tile lists from the staging pool), each side by side with HF flatten + FA2
# varlen in the same call: 1B FLAN-like (+ profile), 1B OrcaMath-like, Llama-2-7B cut to 8
# layers (FLAN-like); then ncu of the three rmsnorm-backward kernels (data for the next lever).
# Usage (GPU host, repo root): bench/device_run15.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/logs
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$out/env.txt"
save() { tar czf "$out/results15.tgz" --exclude=export/model -C /tmp logs $(cd /tmp && ls -d f15 o15 l15 2>/dev/null) 2>/dev/null; }
show() { tr '\r' '\n' < "/tmp/logs/$1.txt" | grep -v "step [0-9]*/" | grep -E "^ (flatten|pad)|profiled|attention" | head -8; cat /tmp/$1/compare.txt 2>/dev/null; }
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
HF_MODES=flatten timeout 150 bench/side_by_side.sh $d/nopad /tmp/f15 $c1 --profile-steps 3 > "/tmp/logs/f15.txt" 2>&1
echo "== f15 (1B FLAN) at ${SECONDS}s"; show f15; save
c2="--model llama-3.2-1b --data synthetic-orcamath --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15"
HF_MODES=flatten timeout 120 bench/side_by_side.sh $d/nopad /tmp/o15 $c2 > "/tmp/logs/o15.txt" 2>&1
echo "== o15 (1B OrcaMath) at ${SECONDS}s"; show o15; save
if [ $SECONDS -lt 330 ]; then
  HF_MODES=flatten timeout 130 bench/side_by_side.sh $d/nopad /tmp/l15 --model llama-2-7b --layers 8 --data synthetic-flan \
    --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12 > "/tmp/logs/l15.txt" 2>&1
  echo "== l15 (7B shape FLAN) at ${SECONDS}s"; show l15; save
fi
if [ $SECONDS -lt 470 ]; then
  timeout 80 ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy \
    -k regex:"rmsnorm_bwd|partials_finish" --launch-skip 100 --launch-count 6 \
    $d/nopad bench --device cuda --out /tmp/nc15 $c1 --warmup 1 --steps 2 > /tmp/logs/ncu_rms.txt 2>&1
  echo "ncu rc=$? at ${SECONDS}s"
  grep -E "^  [a-z_]+.*\(|Duration|Memory Throughput|Achieved Occupancy|Grid Size|Registers Per" /tmp/logs/ncu_rms.txt | head -40
  save
fi
echo "all done at ${SECONDS}s"
