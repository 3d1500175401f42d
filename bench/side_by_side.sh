#!/usr/bin/env bash
# One command on the GPU host: nopad bench (every strategy, exporting the run), the HF baseline
# on the same weights, examples and order (pad + SDPA, flatten + FA2 varlen), checkpoint parity,
# and the side-by-side table.
#
# Usage: bench/side_by_side.sh NOPAD_BINARY OUT_DIR [extra nopad bench flags...]
# e.g.   bench/side_by_side.sh .device/nopad runs/1b-flan --model llama-3.2-1b --data synthetic-flan --batch-size 16
set -euo pipefail
nopad=$1; out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
"$nopad" bench --device cuda --out "$out" --export "$out/export" "$@" 2>&1 | tee "$out/nopad.log"
python3 "$here/hf_baseline.py" "$out/export" pad --json "$out/hf-pad.json" > /dev/null
python3 "$here/hf_baseline.py" "$out/export" flatten --json "$out/hf-flatten.json" > /dev/null
python3 "$here/hf_baseline.py" "$out/export" parity --json "$out/hf-parity.json" > /dev/null
"$nopad" eval --model "$out/export/model" --data "$out/export/heldout.jsonl" --device cuda --dtype f32 --json > "$out/nopad-eval.json"
python3 "$here/compare.py" "$out/results.json" "$out/hf-pad.json" "$out/hf-flatten.json" "$out/hf-parity.json" "$out/nopad-eval.json" | tee "$out/compare.txt"
