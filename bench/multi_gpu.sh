#!/usr/bin/env bash
# The runs on several GPUs of one host (docs/BENCHMARKS.md, "several GPUs"): scaling 1 -> N GPUs at
# the same global batch, 8B full fine-tuning per stage, the paper's strategy table on 8 GPUs, a
# rank killed mid-step, and two processes as two "nodes" through MASTER_ADDR/MASTER_PORT.
#
# Usage: bench/multi_gpu.sh [--nopad PATH] [--gpus N] [--run NAME]... OUT_DIR
#   --nopad PATH   the nopad binary (default .device/gpu/nopad)
#   --gpus N       GPUs on this host (default: nvidia-smi's count)
#   --run NAME     scaling | 8b | paper | failure | nodes (repeatable; default all that fit N)
# Needs libnccl on LD_LIBRARY_PATH (this script adds PyTorch's when it finds it).
#
# Every run is `nopad train` on synthetic data with a JSON-lines log; the summary at the end reads
# the logs: tokens/s (the whole step's tokens, every rank's), per-step losses, peak memory (rank 0).
set -u
nopad=.device/gpu/nopad gpus="" runs=()
while [ $# -gt 0 ]; do
  case $1 in
    --nopad) nopad=${2:?}; shift ;;
    --gpus) gpus=${2:?}; shift ;;
    --run) runs+=("${2:?}"); shift ;;
    -*) echo "multi_gpu.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
[ $# -eq 1 ] || { sed -n 2,13p "$0"; exit 2; }
out=$1; mkdir -p "$out"; out=$(cd "$out" && pwd)
[ -n "$gpus" ] || gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
[ ${#runs[@]} -gt 0 ] || runs=(scaling 8b paper failure nodes)
nl=$(python3 -c 'import nvidia.nccl as m, os; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$nl" ] && export LD_LIBRARY_PATH=$nl:${LD_LIBRARY_PATH:-}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/nopad-cache}
summary=$out/summary.txt; : > "$summary"
note() { echo "$*" | tee -a "$summary"; }
{ date -u; "$nopad" --version; nvidia-smi --query-gpu=name,memory.total --format=csv; } > "$out/env.txt" 2>&1

# train LABEL GPUS FLAGS...: one run, its log in OUT/LABEL.jsonl
train() {
  local label=$1 n=$2; shift 2
  local how=(--gpus "$n"); [ "$n" = 1 ] && how=(--device cuda)
  timeout 1800 "$nopad" train "${how[@]}" --no-progress --log-every 1 --log "$out/$label.jsonl" "$@" \
    > "$out/$label.txt" 2>&1
  note "$label: rc=$? at ${SECONDS}s"
}

one_b="--model llama-3.2-1b --max-len 4096 --steps 30 --warmup 3 --lr 1e-5"
for r in "${runs[@]}"; do
  case $r in
  scaling)  # 1: same global batch (16 examples a step) on 1 and N GPUs, FLAN- and OrcaMath-like
    for data in flan orcamath; do
      d="--data synthetic-$data --synthetic-examples 4000"
      train "scale-$data-1gpu" 1 $one_b $d --batch-size 16
      for s in 0 1 2; do
        train "scale-$data-${gpus}gpu-shard$s" "$gpus" $one_b $d --batch-size $((16 / gpus)) --shard $s
      done
    done ;;
  8b)  # 2: Llama-3.1-8B full fine-tuning, fp32 master weights, the stage the plan picks
    for n in 2 4 8; do
      [ "$n" -le "$gpus" ] || continue
      train "8b-${n}gpu" "$n" --model llama-3.1-8b --data synthetic-flan --synthetic-examples 2000 \
        --max-len 4096 --batch-size $((32 / n)) --steps 20 --warmup 3 --lr 1e-5 --optim-states 8bit
    done ;;
  paper)  # 3: the paper's table: 7-8B shape, padding vs flatten vs offline packing, 8 GPUs
    [ "$gpus" -ge 8 ] || { note "paper: needs 8 GPUs"; continue; }
    for data in flan orcamath; do
      for st in pad flatten offline; do
        train "paper-$data-$st" 8 --model llama-2-7b --data synthetic-$data --synthetic-examples 4000 \
          --max-len 4096 --batch-size 4 --strategy $st --steps 20 --warmup 3 --lr 1e-5 --shard 1
      done
    done ;;
  failure)  # 4: SIGKILL one worker mid-run: every rank must stop within 60 s, naming it
    [ "$gpus" -ge 2 ] || { note "failure: needs 2 GPUs"; continue; }
    ( timeout 600 "$nopad" train --gpus 2 --no-progress $one_b --data synthetic-flan --batch-size 8 \
        --steps 200 --save-every 20 --out "$out/fail" > "$out/failure.txt" 2>&1; echo "rc=$?" >> "$out/failure.txt" ) &
    sleep 90
    victim=$(pgrep -f "nopad train .*--out $out/fail" | tail -1)
    t0=$SECONDS; kill -9 "$victim"; wait
    note "failure: killed pid $victim; launcher returned after $((SECONDS - t0)) s: $(tail -3 "$out/failure.txt" | tr '\n' ' ')"
    train failure-resume 2 $one_b --data synthetic-flan --batch-size 8 --steps 60 --out "$out/fail" --resume latest ;;
  nodes)  # 5: two processes as two "nodes" on this host, through the variables a launcher sets
    [ "$gpus" -ge 2 ] || { note "nodes: needs 2 GPUs"; continue; }
    port=$((29500 + RANDOM % 1000))
    for rank in 0 1; do
      RANK=$rank WORLD_SIZE=2 LOCAL_RANK=$rank LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        timeout 900 "$nopad" train --no-progress $one_b --data synthetic-flan --batch-size 8 --steps 20 \
        --log "$out/nodes-$rank.jsonl" > "$out/nodes-$rank.txt" 2>&1 &
    done
    wait; note "nodes: $(tail -2 "$out/nodes-0.txt" | tr '\n' ' ')" ;;
  *) echo "multi_gpu.sh: unknown run $r" >&2; exit 2 ;;
  esac
done

python3 - "$out" <<'PY' >> "$summary"
import glob, json, os, sys
out = sys.argv[1]
print(f"{'run':<34} {'steps':>5} {'tok/s (median)':>15} {'peak GiB':>9} {'last loss':>10}")
for f in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
    recs = [json.loads(l) for l in open(f) if '"loss"' in l and '"step"' in l]
    if not recs:
        continue
    tps = sorted(r["tokens_per_s"] for r in recs[3:] or recs)
    print(f"{os.path.basename(f)[:-6]:<34} {len(recs):>5} {tps[len(tps) // 2]:>15.0f} "
          f"{max(r['peak_memory_bytes'] for r in recs) / 2**30:>9.2f} {recs[-1]['loss']:>10.4f}")
PY
cat "$summary"
