#!/bin/bash
# nopad-flash run 6a (one device call, <= 480 s): the per-sequence backward (bwd_seq.cu) checked
# on every shape with seq_max = 511, the bench table + PyTorch side by side with it, then
# bench-only variants: seq_max 0 (the previous default), 255, 127; the long backward with its
# query tiles in reverse order (FA2's order); one ncu profile of flash_bwd_seq_128. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-6061129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
FLASH_BWD=seq_max=511 timeout 200 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; el check $?
grep -E "^FAIL|failures|panicked|rror" $OUT/check.log | head; grep -c "^PASS" $OUT/check.log
PYTHONUNBUFFERED=1 timeout 80 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1; el torch $?
tail -11 $OUT/torch.log
mkdir -p /tmp/v
var() {  # name, FLASH_SUBST, FLASH_BWD, shapes
  FLASH_SUBST="$2" FLASH_BWD="$3" timeout 40 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$4" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s fwd64 %6s wide %6s auto %6s det %6s atomic %6s\n", $1, $7, $11, $15, $19, $23}'
}
SH="b_,c_,d_500xU8-256_d64,d_500xU8-256_d128"
var seq0 "" "seq_max=0" "$SH"
var seq255 "" "seq_max=255" "$SH"
var seq127 "" "seq_max=127" "$SH"
var rev "m0 + s % steps_per_head=>nq - 1 - s % steps_per_head" "seq_max=511" "a_,e_"
NCU="ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats"
FLASH_BWD=seq_max=511 timeout 60 $NCU -k regex:flash_bwd_seq_128 --launch-count 1 ./flash-check --seed $S --skip-check --reps 1 --bench-only d_500xU8-256_d128 > /tmp/v/ncu_seq.log 2>&1; el ncu_seq $?
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issue Slots Busy|No Eligible|L2 Hit|flash_bwd" /tmp/v/ncu_seq.log | head -20
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
