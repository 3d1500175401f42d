#!/usr/bin/env python3
"""Summarise an `nsys stats -r cuda_gpu_trace --format csv` export: per-kernel device time and
the idle time before each kind of op (where the GPU waited for the host).

Usage: nsys_gaps.py TRACE.csv [FRACTION]  (ops in the first FRACTION of the trace are ignored:
set-up and warm-up; default 0.5)
"""
import csv
import sys
from collections import defaultdict

rows = []
with open(sys.argv[1]) as f:
    for r in csv.DictReader(f):
        try:
            start, dur = int(r["Start (ns)"]), int(r["Duration (ns)"])
        except (KeyError, ValueError):
            continue
        rows.append((start, dur, r.get("Name", "?")))
rows.sort()
frac = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
t0 = rows[0][0] + int(frac * (rows[-1][0] - rows[0][0]))
rows = [r for r in rows if r[0] >= t0]
busy = defaultdict(int)
count = defaultdict(int)
gap_before = defaultdict(int)
end = rows[0][0]
for start, dur, name in rows:
    key = name.split("(")[0].split("<")[0][:48]
    busy[key] += dur
    count[key] += 1
    if start > end:
        gap_before[key] += start - end
    end = max(end, start + dur)
span = end - rows[0][0]
total_busy = sum(busy.values())
print(f"span {span / 1e6:.2f} ms, busy {total_busy / 1e6:.2f} ms, idle {(span - total_busy) / 1e6:.2f} ms")
print(f"{'op':48} {'count':>6} {'busy ms':>9} {'us/op':>8} {'idle before ms':>15}")
for key in sorted(busy, key=lambda k: -busy[k])[:25]:
    print(f"{key:48} {count[key]:6d} {busy[key] / 1e6:9.2f} {busy[key] / count[key] / 1e3:8.1f} {gap_before[key] / 1e6:15.2f}")
print("most idle time before:")
for key in sorted(gap_before, key=lambda k: -gap_before[k])[:8]:
    print(f"  {key:48} {gap_before[key] / 1e6:8.2f} ms over {count[key]} ops")
