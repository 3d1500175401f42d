#!/bin/bash
# nopad-flash run 7c (one device call, <= 540 s): the wgmma forward (fwd_wg.cu, ForwardWgmma::All
# by default at Dh 128 on sm_90a) with the wgmma backwards of runs 7a/7b. GPU tests, every check
# shape and the bench table with PyTorch side by side; bench-only variants in the same call:
# FLASH_FWD=wg=off (the mma.sync Auto forward), wg=short (wide kernel for sequences >= 512),
# the default again. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7073129}
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
var() {  # name, FLASH_FWD, shapes
  FLASH_FWD="$2" timeout 45 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$3" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s fwd64 %6s wide %6s auto %6s det %6s\n", $1, $7, $11, $15, $19}'
}
SH="a_,b_,d_500xU8-256_d128,d_2000xU1-32_d128,e_"
var def "wg=all" "$SH"
var off "wg=off" "$SH"
var short "wg=short" "$SH"
var def2 "wg=all" "$SH"
NCU="ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
timeout 60 $NCU -k regex:flash_fwd_wg --launch-count 1 ./flash-check --seed $S --skip-check --reps 1 --bench-only d_500xU8-256_d128 > /tmp/v/ncu_fwg.log 2>&1; el ncu_fwg $?
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|No Eligible|L2 Hit|Achieved Occupancy|flash_fwd" /tmp/v/ncu_fwg.log | head -12
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
