#!/bin/bash
# nopad-flash run 7b (one device call, <= 540 s): the wgmma deterministic kernels
# (bwd_wgs.cu: dQ by recompute and dK/dV over 64-key tiles, short_wgmma, now the default with
# the long wgmma kernel). GPU tests (both kernel families), every check shape and the bench
# table with PyTorch side by side; bench-only variants in the same call: short_wg=0 (run 7a's
# kernels), the long kernel in FA2's grid order (WG_HEADS_FAST 0), the default again; ncu of the
# two new kernels on d_500 d128. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7072129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
timeout 150 ./flash_gpu_test --nocapture --test-threads 1 > $OUT/gputest.log 2>&1; el gputest $?
grep -E "^test |skipped|panicked|relative|FAIL|result" $OUT/gputest.log | head -20
timeout 200 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; el check $?
grep -E "^FAIL|failures|panicked|rror" $OUT/check.log | head; grep -c "^PASS" $OUT/check.log
PYTHONUNBUFFERED=1 timeout 80 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1; el torch $?
tail -11 $OUT/torch.log
mkdir -p /tmp/v
var() {  # name, FLASH_SUBST, FLASH_BWD, shapes
  FLASH_SUBST="$2" FLASH_BWD="$3" timeout 45 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$4" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s auto %6s det %6s atomic %6s\n", $1, $15, $19, $23}'
}
SH="a_,b_,d_500xU8-256_d128,d_2000xU1-32_d128,e_"
var def "" "" "$SH"
var old "" "short_wg=0" "$SH"
var l2 "#define WG_HEADS_FAST 1=>#define WG_HEADS_FAST 0" "" "a_,b_,e_"
var def2 "" "" "$SH"
NCU="ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section LaunchStats"
timeout 90 $NCU -k regex:flash_bwd_wgs --launch-count 2 ./flash-check --seed $S --skip-check --reps 1 --bench-only d_500xU8-256_d128 > /tmp/v/ncu_wgs.log 2>&1; el ncu_wgs $?
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Issue Slots Busy|No Eligible|L2 Hit|Achieved Occupancy|flash_bwd" /tmp/v/ncu_wgs.log | head -24
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
