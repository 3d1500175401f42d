#!/usr/bin/env bash
# A/B of nopad-flash kernels in the model: the same nopad (commit of this script) built with the
# kernels before the fa-perf merge (nopad_oldfa) and after (nopad), Llama-3.2-1B FLAN-like,
# interleaved twice, each with an op profile. Usage: bench/device_run6.sh OUT_DIR
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache
mkdir -p "$out"
c1="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20 --profile-steps 3 --device cuda"
for i in 1 2; do
  for b in nopad_oldfa nopad; do
    echo "== $b run $i"
    timeout 60 $d/$b bench $c1 --out /tmp/$b$i 2>&1 | tr '\r' '\n' | grep -E "^ flatten|profiled|attention|lm_head|adamw"
  done
done > "$out/ab.txt"
cat "$out/ab.txt"
