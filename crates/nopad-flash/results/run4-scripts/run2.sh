#!/bin/bash
# nopad-flash final device run: bench-only knob variants, pick knobs (choose.py), then the full
# check + bench + PyTorch side by side with exactly the chosen kernel sources.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-20261131}
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > $OUT/smi.txt 2>&1
T0=$(date +%s)
V="b_,c_,d_"
var() {
  FLASH_SUBST="$2" timeout 20 ./flash-check --seed $S --skip-check --reps 10 --bench-only "$3" > $OUT/var_$1.log 2>&1
  echo "var $1 rc=$? $(( $(date +%s) - T0 )) s"
}
K1="WM == 1 && DH == 64=>WM == 1;;FWD_ENTRY(128, 1, flash_fwd_128, 4)=>FWD_ENTRY(128, 1, flash_fwd_128, 3)"
K2="#define DQ64_MINB 3=>#define DQ64_MINB 4"
K3="#define DKDV64_MINB 3=>#define DKDV64_MINB 4"
var base "" "$V"
var k1 "$K1" "b_,d_500xU8-256_d128,d_2000xU1-32_d128"
var k2 "$K2" "c_,d_500xU8-256_d64,d_2000xU1-32_d64"
var k3 "$K3" "c_,d_500xU8-256_d64,d_2000xU1-32_d64"
SUB=$(python3 choose.py $OUT "k1|3|$K1" "k2|4|$K2" "k3|4|$K3")
cat $OUT/choice.txt
FLASH_SUBST="$SUB" timeout 150 ./flash-check --seed $S --dump /tmp/fd --reps 20 > $OUT/check.log 2>&1
echo "check rc=$? $(( $(date +%s) - T0 )) s"
grep -E "^FAIL|failures|FLASH_SUBST" $OUT/check.log; grep -c "^PASS" $OUT/check.log
tail -9 $OUT/check.log
PYTHONUNBUFFERED=1 timeout 50 python3 flash_vs_torch.py /tmp/fd 20 > $OUT/torch.log 2>&1
echo "torch rc=$? $(( $(date +%s) - T0 )) s"
tail -12 $OUT/torch.log
