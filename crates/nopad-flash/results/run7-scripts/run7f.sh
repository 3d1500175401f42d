#!/bin/bash
# nopad-flash run 7f (one device call, <= 200 s): the final binary (forward selection refactored
# after run 7e). GPU tests; flash-check on the tiny, lens and lognormal shapes with the default
# forward and with FLASH_FWD=wg=off and wg=short (every arm of the forward choice). Logs: $OUT.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-7076129}
T0=$(date +%s)
el() { echo "$1 rc=$2 $(( $(date +%s) - T0 )) s"; }
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv; } > $OUT/env.txt 2>&1
timeout 60 ./flash_gpu_test --nocapture --test-threads 1 > $OUT/gputest.log 2>&1; el gputest $?
grep -E "^test |panicked|FAIL|result" $OUT/gputest.log | head -8
for fw in all off short; do
  FLASH_FWD=wg=$fw timeout 60 ./flash-check --seed $S --skip-bench --only tiny,lens_,lognormal8k > $OUT/check_$fw.log 2>&1; el "check wg=$fw" $?
  grep -E "failures|panicked|rror" $OUT/check_$fw.log | head -3; echo "  PASS $(grep -c '^PASS' $OUT/check_$fw.log)"
done
