#!/bin/bash
# nopad-flash run 7a (one device call, <= 540 s): the wgmma long backward (bwd_wg.cu,
# LongKeys::Wgmma). First the GPU tests (operand-layout self-test against CPU products, the long
# shapes through both backwards, the tiny shapes); then every check shape with
# long_atomic=wg,long_det=wg and the bench table with PyTorch side by side; then the current
# default (split) bench-only on the long shapes in the same call; one ncu profile. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7071129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
timeout 150 ./flash_gpu_test --nocapture --test-threads 1 > $OUT/gputest.log 2>&1; el gputest $?
grep -E "^test |skipped|panicked|relative|FAIL|result" $OUT/gputest.log | head -20
FLASH_BWD=long_atomic=wg,long_det=wg timeout 200 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; el check $?
grep -E "^FAIL|failures|panicked|rror" $OUT/check.log | head; grep -c "^PASS" $OUT/check.log
PYTHONUNBUFFERED=1 timeout 80 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1; el torch $?
tail -11 $OUT/torch.log
mkdir -p /tmp/v
var() {  # name, FLASH_BWD, shapes
  FLASH_BWD="$2" timeout 40 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$3" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s auto %6s det %6s atomic %6s\n", $1, $15, $19, $23}'
}
var split "" "a_,b_,e_"
var wg "long_atomic=wg,long_det=wg" "a_,b_,e_"
var split2 "" "a_,b_,e_"
NCU="ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
FLASH_BWD=long_atomic=wg timeout 60 $NCU -k regex:flash_bwd_wg_dq_128 --launch-count 1 ./flash-check --seed $S --skip-check --reps 1 --bench-only a_ > /tmp/v/ncu_wg.log 2>&1; el ncu_wg $?
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Issue Slots Busy|No Eligible|L2 Hit|Executed Ipc|flash_bwd" /tmp/v/ncu_wg.log | head -20
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
