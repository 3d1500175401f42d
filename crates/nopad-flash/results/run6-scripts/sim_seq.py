# Simulate bwd_seq.cu's smem addressing (64-key tiles, 8 warps): stores of P/dS into the
# [64 q][64 keys] tile and every ldmatrix operand read (P^T / dS^T as .trans A, dS as A,
# dO/Q/K as .trans B, Q/dO as A and K/V as B), against the m16n8k16 fragment layouts.
# Reuses the helpers of run5-scripts/sim_long.py (exec'd up to its first loop).
import os
src = open(os.path.join(os.path.dirname(__file__), '../run5-scripts/sim_long.py')).read()
exec(src[:src.index('for DH in (64, 128):')])
for DH in (64, 128):
    DW = DH // 2
    mem = {}
    for w in range(8):
        wm, wn = w & 3, w >> 2
        for l in range(32):
            g, t = l >> 2, l & 3
            for ni in range(4):
                pw = 2*swz(64, 16*wm + g, 4*wn + ni) + 4*t
                for r in range(2):
                    a = pw + 1024*r
                    for e in range(2):
                        assert a + 2*e not in mem
                        mem[a + 2*e] = (16*wm + g + 8*r, 32*wn + 8*ni + 2*t + e)
    assert len(mem) == 64*64 and max(mem) < 64*64*2
    for w in range(8):  # P^T as .trans A: keys 16wk.., queries 16kq..
        wk = w >> 1
        for kq in range(4):
            addrs = [lane_off(64, l, True, wk) + 2048*kq for l in range(32)]
            regs = ldsm(mem, addrs, True)
            for T in range(32):
                exp = afrag(lambda r, c: (16*kq + c, 16*wk + r), T)
                assert regs[T] == exp, (DH, 'PT', w, kq, T, regs[T], exp)
    for w in range(8):  # dS as A of dQ: rows 16wq.., keys 16kk..
        wq = w & 3
        for kk in range(4):
            regs = ldsm(mem, [Swz(64, l, False).at(16*wq, kk) for l in range(32)], False)
            for T in range(32):
                assert regs[T] == afrag(lambda r, c: (16*wq + r, 16*kk + c), T), (DH, 'dSA', w, kk, T)
    memt = {}
    for r in range(64):
        for cidx in range(DH):
            memt[2*swz(DH, r, cidx >> 3) + 2*(cidx & 7)] = (r, cidx)
    for w in range(8):
        wd, wc = w & 1, w >> 2
        for dp in range(DW//16):
            for kq in range(4):  # dO / Q as .trans B of dV / dK (k = query, n = column)
                regs = ldsm(memt, [lane_off(DH, l, False, (DW//16)*wd + dp) + 32*kq*DH for l in range(32)], True)
                for T in range(32):
                    assert regs[T] == bfrag2(lambda k, n: (16*kq + k, DW*wd + 16*dp + n), T), (DH, 'dO', w, dp, kq, T)
                # K as .trans B of dQ (k = key, n = column)
                regs = ldsm(memt, [lane_off(DH, l, False, (DW//16)*wc + dp) + 32*kq*DH for l in range(32)], True)
                for T in range(32):
                    assert regs[T] == bfrag2(lambda k, n: (16*kq + k, DW*wc + 16*dp + n), T), (DH, 'K', w, dp, kq, T)
    for w in range(8):  # S / dP: Q as A (rows 16wm), K as B (keys 32wn + 16np)
        wm, wn = w & 3, w >> 2
        for kk in range(DH//16):
            regs = ldsm(memt, [Swz(DH, l, False).at(16*wm, kk) for l in range(32)], False)
            for T in range(32):
                assert regs[T] == afrag(lambda r, c: (16*wm + r, 16*kk + c), T)
            for np_ in range(2):
                regs = ldsm(memt, [Swz(DH, l, True).at(32*wn + 16*np_, kk) for l in range(32)], False)
                for T in range(32):
                    assert regs[T] == bfrag2(lambda k, n: (32*wn + 16*np_ + n, 16*kk + k), T)
    print("DH", DH, "ok")
