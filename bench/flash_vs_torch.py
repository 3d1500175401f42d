#!/usr/bin/env python3
"""nopad-flash vs PyTorch varlen attention, on the same data, in the same machine session.

Reads the directory written by `flash-check bench --dump DIR` (manifest.tsv plus raw little-endian
files per shape: cu_seqlens i32, qkv/d_out/out/d_qkv bf16 bits, lse f32), then for each shape:
  1. runs torch.nn.attention.varlen.varlen_attn (PyTorch's built-in FA2; causal = window (-1, 0);
     no GQA flag in 2.11, so K/V heads are repeat_interleaved) forward and backward on nopad's
     inputs and prints max |nopad - torch| and the relative L2 difference for out, lse, dq, dk, dv;
  2. times PyTorch forward and backward with CUDA events (3 warm-ups, median of REPS) and prints
     a side-by-side table against nopad's times from the manifest (causal FLOPs, docs/FLASH.md section 11;
     nopad's forward = its default `Auto` tiling);
     nopad's backward is its default (deterministic) one.
Usage: python3 flash_vs_torch.py DIR [REPS]
"""
import sys

import numpy as np
import torch
from torch.nn.attention.varlen import varlen_attn

try:
    from torch.nn.attention.varlen import AuxRequest
except ImportError:  # older layouts
    AuxRequest = None

DIR = sys.argv[1]
REPS = int(sys.argv[2]) if len(sys.argv) > 2 else 20


def bf16(path, shape):
    a = np.fromfile(path, dtype=np.int16)
    return torch.from_numpy(a).view(torch.bfloat16).reshape(shape).cuda()


def diff(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn):
    for _ in range(3):
        fn()
    t = []
    for _ in range(REPS):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        t.append(e0.elapsed_time(e1))
    t.sort()
    return t[len(t) // 2], t[0], t[-1]


table = []
for line in open(f"{DIR}/manifest.tsv"):
    name, S, N, H, Hkv, Dh, scale, nf, nb = line.rstrip("\n").split("\t")
    S, N, H, Hkv, Dh, scale, nf, nb = int(S), int(N), int(H), int(Hkv), int(Dh), float(scale), float(nf), float(nb)
    G = H // Hkv
    cu = torch.from_numpy(np.fromfile(f"{DIR}/{name}.cu.i32", dtype=np.int32)).cuda()
    lens = (cu[1:] - cu[:-1]).long()
    max_len = int(lens.max().item())
    flops = 4.0 * Dh * H * float((lens.double() ** 2).sum().item()) / 2.0
    qkv = bf16(f"{DIR}/{name}.qkv.bf16", (N, H + 2 * Hkv, Dh))
    dout = bf16(f"{DIR}/{name}.dout.bf16", (N, H, Dh))
    n_out = bf16(f"{DIR}/{name}.out.bf16", (N, H, Dh))
    n_lse = torch.from_numpy(np.fromfile(f"{DIR}/{name}.lse.f32", dtype=np.float32)).cuda().reshape(H, N)
    n_dqkv = bf16(f"{DIR}/{name}.dqkv.bf16", (N, H + 2 * Hkv, Dh))

    # 1. Parity on the same inputs (GQA through repeat_interleave; autograd sums the group).
    q = qkv[:, :H].contiguous().requires_grad_()
    k = qkv[:, H:H + Hkv].contiguous().requires_grad_()
    v = qkv[:, H + Hkv:].contiguous().requires_grad_()
    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    lse = None
    if AuxRequest is not None:
        out, lse = varlen_attn(q, kr, vr, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0),
                               return_aux=AuxRequest(lse=True))
    else:
        out = varlen_attn(q, kr, vr, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    res = {"out": diff(n_out, out), "dq": diff(n_dqkv[:, :H], dq), "dk": diff(n_dqkv[:, H:H + Hkv], dk),
           "dv": diff(n_dqkv[:, H + Hkv:], dv)}
    if lse is not None:
        lse = lse.reshape(H, N) if lse.numel() == H * N else lse
        res["lse"] = diff(n_lse, lse) if lse.shape == n_lse.shape else (float("nan"), float("nan"))
    print(f"parity {name}: " + "  ".join(f"{k} max {a:.2e} rel {r:.2e}" for k, (a, r) in res.items()), flush=True)
    del q, k, v, kr, vr, out, dq, dk, dv, n_dqkv, n_out

    # 2. Time PyTorch's attention alone (repeated K/V as leaves, so no repeat cost is timed).
    qt = qkv[:, :H].contiguous().requires_grad_()
    kt = qkv[:, H:H + Hkv].repeat_interleave(G, dim=1).contiguous().requires_grad_()
    vt = qkv[:, H + Hkv:].repeat_interleave(G, dim=1).contiguous().requires_grad_()
    with torch.no_grad():
        tf = timed(lambda: varlen_attn(qt, kt, vt, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0)))
    o = varlen_attn(qt, kt, vt, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))
    tb = timed(lambda: torch.autograd.grad(o, (qt, kt, vt), dout, retain_graph=True))
    table.append((name, N, S, flops, nf, tf[0], nb, tb[0]))
    print(f"torch {name}: fwd {tf[0]:.4f} ms [{tf[1]:.4f},{tf[2]:.4f}]  bwd {tb[0]:.4f} ms [{tb[1]:.4f},{tb[2]:.4f}]", flush=True)
    del qt, kt, vt, o, qkv, dout
    torch.cuda.empty_cache()

print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}; TFLOP/s (causal, fwd = 4 Dh H sum L^2 / 2, bwd = 2.5 fwd); median of {REPS}")
print("bwd nopad = its deterministic backward (dQ by recompute); torch's FA2 backward adds dQ atomically")
print(f"{'shape':<26} {'tokens':>7} {'seqs':>5} | {'fwd nopad':>9} {'torch':>7} {'ratio':>6} | {'bwd nopad':>9} {'torch':>7} {'ratio':>6}")
for name, N, S, fl, nf, tf, nb, tb in table:
    a, b = fl / nf / 1e9, fl / tf / 1e9
    c, d = 2.5 * fl / nb / 1e9, 2.5 * fl / tb / 1e9
    print(f"{name:<26} {N:>7} {S:>5} | {a:>9.1f} {b:>7.1f} {a / b:>6.2f} | {c:>9.1f} {d:>7.1f} {c / d:>6.2f}")
