#!/usr/bin/env python3
"""Side-by-side table of `nopad bench` (results.json) and hf_baseline.py runs (JSON files):
tokens/s and peak memory ratios nopad/HF for each mode, and the largest per-step loss difference.

Usage: compare.py NOPAD_RESULTS_JSON HF_PAD_JSON HF_FLATTEN_JSON [HF_PARITY_JSON NOPAD_EVAL_JSON [HF_FLATTEN_AMP_JSON]]
"""
import json
import sys


def load(p):
    with open(p) as f:
        return json.load(f)


def ratio(a, b):
    return a / b if b else float("nan")


def main():
    nopad = {r["strategy"]: r for r in load(sys.argv[1])["results"]}
    hf = {}
    for mode, path in (("pad", sys.argv[2]), ("flatten", sys.argv[3])):
        try:
            hf[mode] = load(path)
        except FileNotFoundError:
            pass
    if len(sys.argv) > 6:
        hf["flatten-amp"] = load(sys.argv[6])
        nopad["flatten-amp"] = nopad.get("flatten")
    gib = 1 << 30
    print(f"{'mode':<11} {'nopad tok/s':>12} {'HF tok/s':>10} {'ratio':>6} | {'nopad GiB':>9} {'HF GiB':>7} {'ratio':>6} | max |Δloss| per step")
    for mode in hf:
        n, h = nopad.get(mode), hf[mode]
        if n is None:
            continue
        d = max(abs(a - b) for a, b in zip(n["losses"], h["losses"]))
        print(
            f"{mode:<11} {n['tokens_per_s']:>12.0f} {h['tokens_per_s']:>10.0f} {ratio(n['tokens_per_s'], h['tokens_per_s']):>6.2f} | "
            f"{n['peak_memory_bytes'] / gib:>9.2f} {h['peak_memory_bytes'] / gib:>7.2f} "
            f"{ratio(n['peak_memory_bytes'], h['peak_memory_bytes']):>6.2f} | {d:.3e} (first step {abs(n['losses'][0] - h['losses'][0]):.2e})"
        )
    if "flatten" in nopad and "flatten" in hf:
        print(f"nopad flatten vs HF flatten + FA2 varlen: {ratio(nopad['flatten']['tokens_per_s'], hf['flatten']['tokens_per_s']):.2f}x tokens/s, "
              f"{ratio(nopad['flatten']['peak_memory_bytes'], hf['flatten']['peak_memory_bytes']):.2f}x peak memory")
    if len(sys.argv) > 5:
        p, e = load(sys.argv[4]), load(sys.argv[5])
        print(f"checkpoint parity: HF loads nopad's checkpoint: loss {p['loss']:.6f} over {p['tokens']} tokens; "
              f"nopad eval {e['loss']:.6f} over {e['tokens']}; relative difference {abs(p['loss'] - e['loss']) / p['loss']:.2e}")


if __name__ == "__main__":
    main()
