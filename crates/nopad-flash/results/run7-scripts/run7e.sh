#!/bin/bash
# nopad-flash run 7e (one device call, <= 300 s): the long wgmma backward in FA2's grid order
# when G = 1 (WG_HEADS_FAST_G1 0). GPU tests; bench-only a, b, e with it, with the old order
# (FLASH_SUBST: heads fastest always), with it again; compute-sanitizer memcheck and racecheck
# on the tiny shapes (wgmma forward and deterministic backward, all variants). Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7075129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv; } > $OUT/env.txt 2>&1
timeout 90 ./flash_gpu_test --nocapture --test-threads 1 > $OUT/gputest.log 2>&1; el gputest $?
grep -E "^test |skipped|panicked|relative|FAIL|result" $OUT/gputest.log | head -20
mkdir -p /tmp/v
var() {  # name, FLASH_SUBST
  FLASH_SUBST="$2" timeout 45 ./flash-check --seed $S --skip-check --reps 10 --bench-only a_,b_,e_ > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s auto %6s det %6s atomic %6s\n", $1, $15, $19, $23}'
}
var g1 ""
var old "#define WG_HEADS_FAST_G1 0=>#define WG_HEADS_FAST_G1 1"
var g1b ""
for tool in memcheck racecheck; do
  timeout 75 compute-sanitizer --tool $tool ./flash-check --seed $S --only tiny --skip-bench > /tmp/v/san_$tool.log 2>&1; el "sanitizer $tool" $?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|^PASS|^FAIL|failures" /tmp/v/san_$tool.log | sort | uniq -c | head -8
done
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
