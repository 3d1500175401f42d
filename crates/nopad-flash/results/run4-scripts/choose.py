#!/usr/bin/env python3
"""Pick FLASH_SUBST knobs from bench-only variant logs: a knob's alternative is adopted only if
its mean per-shape TFLOP/s ratio against the base run beats 1.02. Prints the combined FLASH_SUBST
string; writes the reasoning to OUT/choice.txt."""
import os, sys
out = sys.argv[1]
# knob name -> (column index after the shape part: 1 fwd64, 2 fwd128, 3 fwd auto, 4 bwd det, 5 atomic)
knobs = [(a.split("|")[0], int(a.split("|")[1]), a.split("|", 2)[2]) for a in sys.argv[2:]]

def table(path):
    rows = {}
    for line in open(path, errors="replace"):
        parts = line.split("|")
        if len(parts) != 6 or parts[0].startswith("shape"):
            continue
        try:
            rows[parts[0].split()[0]] = [float(p.split()[-1]) for p in parts[1:]]
        except (ValueError, IndexError):
            pass
    return rows

base = table(f"{out}/var_base.log")
chosen, notes = [], []
for name, col, subst in knobs:
    try:
        var = table(f"{out}/var_{name}.log")
    except OSError:
        var = {}
    ratios = [var[s][col - 1] / base[s][col - 1] for s in var if s in base and base[s][col - 1] > 0]
    mean = sum(ratios) / len(ratios) if ratios else 0.0
    take = bool(ratios) and mean > 1.02
    notes.append(f"{name}: column {col}, {len(ratios)} shapes, ratios "
                 + " ".join(f"{r:.3f}" for r in ratios) + f", mean {mean:.3f} -> {'ADOPT' if take else 'keep default'}")
    if take:
        chosen.append(subst)
open(f"{out}/choice.txt", "w").write("\n".join(notes) + "\nFLASH_SUBST=" + ";;".join(chosen) + "\n")
print(";;".join(chosen))
