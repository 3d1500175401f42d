#!/bin/bash
# nopad-flash run 5b (final, one device call <= 420 s): bench-only variants of the launch orders
# (FLASH_PLAN) and the deterministic long kernel (FLASH_BWD), choose5.py picks, then the full
# check + bench + PyTorch side by side with exactly the chosen settings. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-5052129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
mkdir -p /tmp/v
row() { grep -E "^[a-e]_" $1 | awk '{printf "  %-24s fwd64 %6s wide %6s auto %6s det %6s atomic %6s\n", $1, $7, $11, $15, $19, $23}'; }
var() {  # name, FLASH_PLAN, FLASH_BWD, shapes
  FLASH_PLAN="$2" FLASH_BWD="$3" timeout 30 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$4" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; row /tmp/v/var_$1.log
}
var lg0 "long_group=0" "" "a_,b_,e_"
var lg8 "long_group=8" "" "a_,b_,e_"
var lgF "long_group=65536" "" "a_,b_,e_"
var oc "order=cost" "" "c_,d_"
var os "order=seq" "" "c_,d_"
var ld0 "long_group=0" "long_det=split" "a_,b_,e_"
var ld8 "long_group=8" "long_det=split" "a_,b_,e_"
var ldF "long_group=65536" "long_det=split" "a_,b_,e_"
CH=$(python3 choose5.py /tmp/v); cat /tmp/v/choice.txt; cp /tmp/v/choice.txt $OUT/
export FLASH_PLAN=$(echo "$CH" | sed -n 1p) FLASH_BWD=$(echo "$CH" | sed -n 2p)
timeout 170 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; RC=$?; el check $RC
if [ $RC -ne 0 ]; then  # fall back to the defaults (run 5a's settings) so the table has checked kernels
  mv $OUT/check.log $OUT/check_chosen.log; unset FLASH_PLAN FLASH_BWD
  timeout 170 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1; el check_fallback $?
fi
grep -E "^FAIL|failures|FLASH_" $OUT/check.log; grep -c "^PASS" $OUT/check.log; row $OUT/check.log
PYTHONUNBUFFERED=1 timeout 80 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1; el torch $?
tail -11 $OUT/torch.log
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
