#!/bin/bash
# nopad-flash run 7d (one device call, <= 480 s): the wgmma forward and deterministic backward
# at Dh 64 too (fwd_wg_64, bwd_wgs_{dq,kv}_64). GPU tests, every check shape and the bench table
# with PyTorch side by side; bench-only variants on the Dh-64 shapes in the same call: the
# default, everything on mma.sync (FLASH_FWD=wg=off + short_wg=0), forward only off, backward
# only off, the default again. Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7074129}
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
var() {  # name, FLASH_FWD, FLASH_BWD, shapes
  FLASH_FWD="$2" FLASH_BWD="$3" timeout 45 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$4" > /tmp/v/var_$1.log 2>&1
  el "var $1" $?; grep -E "^[a-e]_" /tmp/v/var_$1.log | awk '{printf "  %-24s fwd64 %6s auto %6s det %6s\n", $1, $7, $15, $19}'
}
SH="c_,d_500xU8-256_d64,d_2000xU1-32_d64"
var def "wg=all" "" "$SH"
var old "wg=off" "short_wg=0" "$SH"
var fo "wg=off" "" "$SH"
var bo "wg=all" "short_wg=0" "$SH"
var def2 "wg=all" "" "$SH"
tar czf $OUT/vars.tgz -C /tmp/v . ; el done 0
