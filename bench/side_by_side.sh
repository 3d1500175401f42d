#!/usr/bin/env bash
# One command on the GPU host: nopad bench (every strategy, exporting the run), the HF baseline
# on the same weights, examples and order (pad + SDPA, flatten + FA2 varlen, in bf16 and with fp32
# weights and optimizer states under autocast), checkpoint parity,
# and the side-by-side table.
#
# Usage: bench/side_by_side.sh NOPAD_BINARY OUT_DIR [extra nopad bench flags...]
# HF_MODES (default "pad flatten flatten-amp parity") chooses the HF runs; flatten-ckpt adds
# gradient checkpointing (what HF needs for a 7-8B model on one 80 GB GPU).
# e.g.   bench/side_by_side.sh .device/nopad runs/1b-flan --model llama-3.2-1b --data synthetic-flan --batch-size 16
set -euo pipefail
nopad=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
"$nopad" bench --device cuda --out "$out" --export "$out/export" "$@" 2>&1 | tee "$out/nopad.log"
modes=${HF_MODES:-pad flatten flatten-amp parity}
for m in $modes; do
  case $m in
    flatten-amp) python3 "$here/hf_baseline.py" "$out/export" flatten --amp --json "$out/hf-$m.json" > /dev/null ;;
    flatten-ckpt) python3 "$here/hf_baseline.py" "$out/export" flatten --grad-ckpt --json "$out/hf-$m.json" > /dev/null ;;
    *) python3 "$here/hf_baseline.py" "$out/export" "$m" --json "$out/hf-$m.json" > /dev/null ;;
  esac
done
if [[ " $modes " == *" parity "* ]]; then
  "$nopad" eval --model "$out/export/model" --data "$out/export/heldout.jsonl" --device cuda --dtype f32 --json > "$out/nopad-eval.json"
fi
args=("$out/results.json" "$out/hf-pad.json" "$out/hf-flatten.json")
[[ -f "$out/nopad-eval.json" ]] && args+=("$out/hf-parity.json" "$out/nopad-eval.json")
[[ -f "$out/hf-flatten-amp.json" && -f "$out/nopad-eval.json" ]] && args+=("$out/hf-flatten-amp.json")
python3 "$here/compare.py" "${args[@]}" | tee "$out/compare.txt"
