#!/usr/bin/env python3
"""Run 5b: pick plan/backward knobs from bench-only variant logs (DIR/var_NAME.log) and print
the FLASH_PLAN and FLASH_BWD strings for the final check; reasoning goes to DIR/choice.txt.
Columns of a table row after the shape part: 1 fwd64, 2 fwd128, 3 fwd auto, 4 bwd det, 5 atomic.
- long_group: best mean atomic TFLOP/s over the a/b/e shapes among lg0 / lg8 / lgF; adopted
  only if its mean ratio against lg0 beats 1.02.
- order=seq: adopted if the mean ratio (auto fwd and det bwd, c and d shapes) against order=cost
  beats 1.01 and no single ratio is below 0.96.
- long_det=split (with the chosen long_group): adopted if its mean det ratio on a/b/e against the
  chosen long_group's run beats 1.02."""
import sys
out = sys.argv[1]

def table(name):
    rows = {}
    try:
        for line in open(f"{out}/var_{name}.log", errors="replace"):
            parts = line.split("|")
            if len(parts) != 6 or parts[0].startswith("shape"):
                continue
            try:
                rows[parts[0].split()[0]] = [float(p.split()[-1]) for p in parts[1:]]
            except (ValueError, IndexError):
                pass
    except OSError:
        pass
    return rows

def ratios(a, b, cols):
    return [a[s][c - 1] / b[s][c - 1] for s in a if s in b for c in cols if b[s][c - 1] > 0]

notes = []
lg = {"0": table("lg0"), "8": table("lg8"), "65536": table("lgF")}
best, best_mean = "0", 1.0
for k in ("8", "65536"):
    r = ratios(lg[k], lg["0"], [5])
    m = sum(r) / len(r) if r else 0.0
    notes.append(f"long_group={k}: atomic ratios vs 0 " + " ".join(f"{x:.3f}" for x in r) + f" mean {m:.3f}")
    if r and m > 1.02 and m > best_mean:
        best, best_mean = k, m
notes.append(f"-> long_group={best}")
oc, os_ = table("oc"), table("os")
r = ratios(os_, oc, [3, 4])
m = sum(r) / len(r) if r else 0.0
seq = bool(r) and m > 1.01 and min(r) > 0.96
notes.append("order=seq vs cost (auto fwd, det bwd): " + " ".join(f"{x:.3f}" for x in r)
             + f" mean {m:.3f} -> {'seq' if seq else 'cost'}")
ld = table(f"ld{best if best != '65536' else 'F'}")
base = lg[best]
r = ratios(ld, base, [4])
m = sum(r) / len(r) if r else 0.0
split = bool(r) and m > 1.02
notes.append(f"long_det=split (long_group={best}) det ratios: " + " ".join(f"{x:.3f}" for x in r)
             + f" mean {m:.3f} -> {'split' if split else 'narrow'}")
plan = f"order={'seq' if seq else 'cost'},long_group={best}"
bwd = f"long_det={'split' if split else 'narrow'}"
notes.append(f"FLASH_PLAN={plan}\nFLASH_BWD={bwd}")
open(f"{out}/choice.txt", "w").write("\n".join(notes) + "\n")
print(plan)
print(bwd)
