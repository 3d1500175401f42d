#!/bin/bash
# nopad-flash device run: full check + bench + torch side by side, then bench-only variants.
set -o pipefail
cd "$(dirname "$0")"
S=${1:-20261130}
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu --format=csv > $OUT/smi.txt 2>&1
T0=$(date +%s)
timeout 150 ./flash-check --seed $S --dump /tmp/fd --reps 20 2>&1 | tee $OUT/check.log
echo "check rc=$? $(( $(date +%s) - T0 )) s"
PYTHONUNBUFFERED=1 timeout 60 python3 flash_vs_torch.py /tmp/fd 20 2>&1 | tee $OUT/torch.log
echo "torch rc=$? $(( $(date +%s) - T0 )) s"
shift
for v in "$@"; do
  name=${v%%:*}; subst=${v#*:}
  FLASH_SUBST="$subst" timeout 22 ./flash-check --seed $S --skip-check --reps 10 2>&1 | tee $OUT/var_$name.log | tail -12
  echo "var $name rc=$? $(( $(date +%s) - T0 )) s"
done
