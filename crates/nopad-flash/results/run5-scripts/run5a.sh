#!/bin/bash
# nopad-flash run 5a (one device call, <= 420 s): full check + bench + PyTorch side by side with
# the branch's defaults, then bench-only variants (FLASH_SUBST / FLASH_BWD), a focused check of
# the non-default long-sequence kernels, and two short ncu profiles. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-5051129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
timeout 160 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; el check $?
grep -E "^FAIL|failures" $OUT/check.log; grep -c "^PASS" $OUT/check.log; grep -E "^[a-e]_" $OUT/check.log | awk '{printf "  %-24s fwd64 %6s wide %6s auto %6s det %6s atomic %6s\n", $1, $7, $11, $15, $19, $23}'
PYTHONUNBUFFERED=1 timeout 70 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1; el torch $?
tail -11 $OUT/torch.log
mkdir -p /tmp/v
var() {  # name, FLASH_SUBST, FLASH_BWD, shapes
  FLASH_SUBST="$2" FLASH_BWD="$3" timeout 30 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$4" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s fwd64 %6s wide %6s auto %6s det %6s atomic %6s\n", $1, $7, $11, $15, $19, $23}'
}
OLDFWD="#define FWD_PREFETCH_V0 1=>#define FWD_PREFETCH_V0 0;;WM == 1 && DH == 64=>WM == 1;;FWD_ENTRY(128, 1, flash_fwd_128, 4)=>FWD_ENTRY(128, 1, flash_fwd_128, 3)"
var old "$OLDFWD" "fused_prep=0,long_atomic=narrow" "a_,b_,c_,d_,e_"
var nofuse "" "fused_prep=0" "c_,d_"
var nopv0 "#define FWD_PREFETCH_V0 1=>#define FWD_PREFETCH_V0 0" "" "b_,c_,d_"
var q3 "WM == 1 && DH == 64=>WM == 1;;FWD_ENTRY(128, 1, flash_fwd_128, 4)=>FWD_ENTRY(128, 1, flash_fwd_128, 3)" "" "b_,d_500xU8-256_d128,d_2000xU1-32_d128"
var ldet "" "long_det=split" "a_,b_,e_"
var rows "" "long_atomic=rows" "a_,b_,e_"
var nodq "LONG_ENTRY(128, flash_bwd_long_dq_128, true)=>LONG_ENTRY(128, flash_bwd_long_dq_128, false)" "" "a_,e_"
var k4 "#define DKDV64_MINB 3=>#define DKDV64_MINB 4" "" "c_,d_500xU8-256_d64,d_2000xU1-32_d64"
FLASH_BWD="long_det=split,long_atomic=rows" timeout 60 ./flash-check --seed $S --skip-bench --only lens_,lognormal8k,tiny > /tmp/v/check2.log 2>&1; el check2 $?
grep -E "^FAIL|failures" /tmp/v/check2.log; grep -c "^PASS" /tmp/v/check2.log
cp $OUT/check.log /tmp/v/ 2>/dev/null
NCU="ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis"
timeout 50 $NCU -k regex:flash_bwd_long_dq_128 --launch-count 1 ./flash-check --seed $S --skip-check --reps 1 --bench-only a_ > /tmp/v/ncu_long.log 2>&1; el ncu_long $?
timeout 50 $NCU -k regex:"flash_bwd_(dkdv|dq)_128" --launch-count 2 ./flash-check --seed $S --skip-check --reps 1 --bench-only d_500xU8-256_d128 > /tmp/v/ncu_short.log 2>&1; el ncu_short $?
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Issue Slots Busy|No Eligible|Stall|flash_bwd" /tmp/v/ncu_long.log | head -30
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
