#!/usr/bin/env bash
# The GPU check of a nopad build, in one call on the GPU host: the GPU test executables, the flash
# kernel check on every shape, the `nopad bench` rows (optionally alternating with an older binary
# in the same call, new/old/new, so that the comparison sees the same machine state), optionally
# side by side with HF Transformers (bench/hf_baseline.py through bench/side_by_side.sh), and an
# optional exact-resume check. Every log goes to OUT_DIR; a short table is printed last and kept
# in OUT_DIR/summary.txt. Every step runs even when one fails; the exit status is 1 if any did.
#
# Binaries are built elsewhere and carried to the host (e.g. in the ignored .device/ folder):
#   cargo build --release -p nopad-cli              -> target/release/nopad
#   cargo test --release --no-run -p nopad-backend -p nopad-model -p nopad-flash
#                                                   -> the test executables under target/release/deps
#
# Usage (GPU host, repository root):
#   bench/gpu_check.sh [options] OUT_DIR
#   --nopad PATH        the nopad binary under test            (default .device/gpu/nopad)
#   --old PATH          an older nopad binary: every bench row is also run with it, alternating
#   --test PATH         a GPU test executable to run (repeatable; run with --test-threads=1)
#   --flash-check       run the flash kernel check on all shapes (command: FLASH_CHECK below)
#   --seed N            seed for the flash check             (default: today's date, YYYYMMDD)
#   --row NAME          a bench row, repeatable: flan-1b, orca-1b, flan-7b8, orca-7b8, flan-8b,
#                       flan-7b, ab-100m (1,000 steps of a 0.1B model: quality A/B of modes)
#   --bench-args "..."  extra flags for every bench row (e.g. "--profile-steps 3")
#   --mode LABEL=FLAGS  run every row once more per mode with FLAGS added, labelled ROW-LABEL
#                       (repeatable; e.g. --mode q8ib="--optim-states 8bit --optim-in-backward");
#                       without any, each row runs once, labelled ROW-new
#   --hf MODES          also run HF on each row with the new binary: HF_MODES of side_by_side.sh,
#                       e.g. "flatten" or "pad flatten flatten-amp parity"
#   --resume            exact resume: 30 steps straight vs 15 + resume, losses compared bit for bit
# e.g. bench/gpu_check.sh --test .device/gpu/cuda_ops --test .device/gpu/cuda_model \
#        --test .device/gpu/flash_gpu_test --flash-check --row flan-1b --old .device/gpu/nopad_old \
#        --hf flatten --bench-args "--profile-steps 3" .device/out
set -uo pipefail

# The flash kernel check (correctness on every test shape, no timing). The harness's command line
# belongs to the nopad-flash crate; if it changes, this is the one line to change. Extra words
# after it come from FLASH_CHECK_ARGS (e.g. "--only lens_d64").
FLASH_CHECK=${FLASH_CHECK:-.device/gpu/flash-check check}
FLASH_CHECK_ARGS=${FLASH_CHECK_ARGS:-}

# Named bench rows: the configurations that docs/BENCHMARKS.md reports.
declare -A ROWS=(
  [flan-1b]="--model llama-3.2-1b --data synthetic-flan --examples 2000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 20"
  [orca-1b]="--model llama-3.2-1b --data synthetic-orcamath --examples 1000 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 15"
  [flan-7b8]="--model llama-2-7b --layers 8 --data synthetic-flan --examples 1500 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12"
  [orca-7b8]="--model llama-2-7b --layers 8 --data synthetic-orcamath --examples 800 --batch-size 8 --max-len 4096 --strategies flatten --warmup 3 --steps 12"
  [flan-8b]="--model llama-3.1-8b --data synthetic-flan --examples 1000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12"
  [ab-100m]="--model llama-100m --data synthetic-flan --examples 20000 --batch-size 16 --max-len 1024 --strategies flatten --warmup 0 --steps 1000 --lr 3e-4"
  [flan-7b]="--model llama-2-7b --data synthetic-flan --examples 1000 --batch-size 16 --max-len 4096 --strategies flatten --warmup 3 --steps 12"
)

usage() { sed -n '/^# Usage/,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

nopad=.device/gpu/nopad old="" seed=$(date -u +%Y%m%d) bench_args="" hf="" flash=0 resume=0
tests=() rows=() modes=()
while [ $# -gt 0 ]; do
  case $1 in
    --nopad) nopad=${2:?}; shift ;;
    --old) old=${2:?}; shift ;;
    --test) tests+=("${2:?}"); shift ;;
    --flash-check) flash=1 ;;
    --seed) seed=${2:?}; shift ;;
    --row) rows+=("${2:?}"); shift ;;
    --bench-args) bench_args=${2:?}; shift ;;
    --mode) modes+=("${2:?}"); shift ;;
    --hf) hf=${2:?}; shift ;;
    --resume) resume=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
  shift
done
[ $# -eq 1 ] || usage
out=$1
for r in "${rows[@]}"; do
  [ -n "${ROWS[$r]:-}" ] || { echo "gpu_check.sh: unknown row '$r' (known: ${!ROWS[*]})" >&2; exit 2; }
done
needs_nopad=()
[ ${#rows[@]} -gt 0 ] || [ $resume = 1 ] && needs_nopad=("$nopad")
for b in "${needs_nopad[@]}" ${old:+"$old"} "${tests[@]}"; do
  [ -x "$b" ] || { echo "gpu_check.sh: $b is not an executable file" >&2; exit 2; }
done

here=$(cd "$(dirname "$0")" && pwd)
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/nopad-cache} PYTHONUNBUFFERED=1
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
failed=0   # set when a test, the flash check, a bench run or the resume check fails
{ date -u; git -C "$here/.." rev-parse --short HEAD 2>/dev/null; "$nopad" --version 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; } > "$out/env.txt"

# 1. GPU tests: every op and the whole model against the CPU backend, the flash kernels.
for t in "${tests[@]}"; do
  name=$(basename "$t"); name=${name%%-*}   # cargo's deps/cuda_ops-<hash> -> cuda_ops
  timeout 300 "$t" --test-threads=1 --nocapture > "$out/test-$name.txt" 2>&1
  rc=$?; [ $rc = 0 ] || failed=1
  note "test $name: rc=$rc; $(grep -E '^test result' "$out/test-$name.txt" | tail -1)"
  grep -E "FAILED|panicked|skipped" "$out/test-$name.txt" | head -5
done

# 2. The flash kernel check on all shapes.
if [ $flash = 1 ]; then
  # shellcheck disable=SC2086  # the command and its arguments are words on purpose
  timeout 300 $FLASH_CHECK --seed "$seed" $FLASH_CHECK_ARGS > "$out/flash-check.txt" 2>&1
  rc=$?; [ $rc = 0 ] || failed=1
  note "flash check (seed $seed): rc=$rc; PASS lines $(grep -c '^PASS' "$out/flash-check.txt"), FAIL lines $(grep -c '^FAIL' "$out/flash-check.txt")"
fi

# 3. Bench rows. With --hf the new binary's first run goes through side_by_side.sh (HF on the
#    same exported weights and examples); with --old the order is new, old, new.
bench() {  # label, binary, row[, extra flags]; writes $out/bench/<label>/ and $out/bench/<label>.txt
  local label=$1 bin=$2 row=$3 extra=${4:-} dir="$out/bench/$1"
  mkdir -p "$out/bench"
  # shellcheck disable=SC2086  # a row, --bench-args and a mode's flags are lists of flags
  timeout 300 "$bin" bench --device cuda --out "$dir" ${ROWS[$row]} $bench_args $extra > "$out/bench/$label.txt" 2>&1
  local rc=$?; [ $rc = 0 ] || failed=1
  echo "bench $label: rc=$rc at ${SECONDS}s"
}
mkdir -p "$out/bench"
for row in "${rows[@]}"; do
  for m in "${modes[@]}"; do
    bench "$row-${m%%=*}" "$nopad" "$row" "${m#*=}"
  done
  [ ${#modes[@]} -gt 0 ] && [ -z "$hf" ] && [ -z "$old" ] && continue
  if [ -n "$hf" ]; then
    # shellcheck disable=SC2086
    HF_MODES=$hf timeout 600 bash "$here/side_by_side.sh" "$nopad" "$out/bench/$row-new" ${ROWS[$row]} $bench_args \
      > "$out/bench/$row-new.txt" 2>&1
    rc=$?; [ $rc = 0 ] || failed=1
    echo "bench $row-new (with HF: $hf): rc=$rc at ${SECONDS}s"
  else
    bench "$row-new" "$nopad" "$row"
  fi
  if [ -n "$old" ]; then
    bench "$row-old" "$old" "$row"
    bench "$row-new2" "$nopad" "$row"
  fi
done

# 4. Exact resume: 30 steps straight against 15 steps, a checkpoint and a resume.
if [ $resume = 1 ]; then
  r=("$nopad" train --device cuda --model small --data synthetic-flan --steps 30 --log-every 1 --no-progress)
  rm -rf "$out/resume"; mkdir -p "$out/resume"
  { "${r[@]}" --out "$out/resume/a" --log "$out/resume/a.jsonl" \
    && "${r[@]}" --out "$out/resume/b" --log "$out/resume/b.jsonl" --save-every 15 --stop-after 15 \
    && "${r[@]}" --out "$out/resume/b" --log "$out/resume/b.jsonl" --resume latest; } > "$out/resume.txt" 2>&1
  rc=$?; [ $rc = 0 ] || failed=1
  note "resume: rc=$rc; $(python3 - "$out/resume/a.jsonl" "$out/resume/b.jsonl" <<'PY'
import json, sys
a, b = ([x for x in map(json.loads, open(p)) if 'loss' in x and 'step' in x] for p in sys.argv[1:3])
same = sum(1 for x, y in zip(a, b) if x['loss'] == y['loss'] and x['grad_norm'] == y['grad_norm'])
print(f"{len(a)} vs {len(b)} logged steps, {same} with bit-identical loss and grad norm")
PY
)"
fi

# 5. The table: one line per bench run (and per HF mode run beside it).
if [ ${#rows[@]} -gt 0 ]; then
  python3 - "$out/bench" <<'PY' >> "$summary"
import glob, json, os, sys
gib = 1 << 30
print(f"{'run':<22} {'strategy':<10} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'last loss':>10}  optimizer")
for d in sorted(glob.glob(os.path.join(sys.argv[1], '*', ''))):
    name = os.path.basename(d.rstrip('/'))
    try:
        res = json.load(open(os.path.join(d, 'results.json')))['results']
    except (OSError, ValueError, KeyError):
        print(f"{name:<22} (no results.json: see {name}.txt)")
        continue
    for r in res:
        print(f"{name:<22} {r['strategy']:<10} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%} {r['peak_memory_bytes'] / gib:>9.2f} {r['losses'][-1]:>10.4f}  {r.get('optimizer', '')}")
    for hf in sorted(glob.glob(os.path.join(d, 'hf-*.json'))):
        h = json.load(open(hf))
        if 'tokens_per_s' in h:
            mode = os.path.basename(hf)[3:-5]
            print(f"{'  HF ' + mode:<22} {'':<10} {h['tokens_per_s']:>9.0f} {'':>6} {h['peak_memory_bytes'] / gib:>9.2f} {h['losses'][-1]:>10.4f}")
PY
fi
echo "== summary ($out/summary.txt), done at ${SECONDS}s"
cat "$summary"
exit $failed
