#!/usr/bin/env bash
# Second GPU session: the flash plan cached per micro-batch (one plan for all layers' forward and
# backward). Checks the model against the CPU again, then nopad flatten vs HF flatten (bf16, and
# fp32 states with autocast) on the Llama-3.2-1B shape, FLAN-like lengths, with a profile.
set -u
out=${1:?OUT_DIR}; d=.device/gpu
export XDG_CACHE_HOME=/tmp/nopad-cache PYTHONUNBUFFERED=1
mkdir -p "$out"
timeout 30 $d/cuda_model --test-threads=1 --nocapture > "$out/tests.log" 2>&1
grep -E "test result|FAILED|panicked|worst|loss cpu" "$out/tests.log"
HF_MODES="flatten flatten-amp" timeout 150 bench/side_by_side.sh $d/nopad /tmp/flan2 --model llama-3.2-1b --data synthetic-flan \
  --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20 --profile-steps 3 > "$out/flan2.log" 2>&1
tar czf "$out/results2.tgz" --exclude=export/model -C /tmp flan2 2>/dev/null
grep -v "step [0-9]*/" "$out/flan2.log" | tr '\r' '\n' | grep -v "step [0-9]*/" | tail -40
