# Simulate bwd_long.cu's smem addressing: stores of P/dS and every ldmatrix operand it reads
# (P^T / dS^T as .trans A, dS as A, dO/Q/K as .trans B), against the m16n8k16 fragment layouts.
import itertools
def swz(DH, r, c): return r*DH + ((c ^ (r & 7)) << 3)           # elements
def lane_off(DH, l, bpat, c2):
    row = (l & 7) + ((l >> 4) << 3) if bpat else (l & 15)
    bit = ((l >> 3) & 1) if bpat else (l >> 4)
    return 2*swz(DH, row, 2*c2 + bit)
class Swz:
    def __init__(s, DH, l, bpat):
        row = (l & 7) + ((l >> 4) << 3) if bpat else (l & 15)
        y = (((l >> 3) & 1) if bpat else (l >> 4)) ^ (l & 7)
        s.DH=DH; s.o=[row*DH*2 + (((2*cl) ^ y) << 4) for cl in range(4)]
    def at(s, r0, c2): assert r0 % 8 == 0; return s.o[c2 & 3] + r0*s.DH*2 + (c2 >> 2)*128
def ldsm(mem, addrs, trans):
    # addrs[lane] = byte address of row (lane%8) of matrix lane//8; returns regs[lane][i] = (lo, hi)
    out = [[None]*4 for _ in range(32)]
    for T in range(32):
        for i in range(4):
            if not trans:
                a = addrs[8*i + T//4] + 2*(2*(T % 4))
                out[T][i] = (mem[a], mem[a+2])
            else:
                a0 = addrs[8*i + 2*(T % 4)] + 2*(T//4); a1 = addrs[8*i + 2*(T % 4) + 1] + 2*(T//4)
                out[T][i] = (mem[a0], mem[a1])
    return out
def afrag(A, T):  # A[row][col] -> expected 4 regs (lo, hi)
    g, t = T >> 2, T & 3
    return [(A(g, 2*t), A(g, 2*t+1)), (A(g+8, 2*t), A(g+8, 2*t+1)),
            (A(g, 2*t+8), A(g, 2*t+9)), (A(g+8, 2*t+8), A(g+8, 2*t+9))]
def bfrag2(B, T):  # B[k][n] for n-tiles 0..7 and 8..15 -> regs b0,b1 (tile 0), b2,b3 (tile 8)
    g, t = T >> 2, T & 3
    return [(B(2*t, g), B(2*t+1, g)), (B(2*t+8, g), B(2*t+9, g)),
            (B(2*t, g+8), B(2*t+1, g+8)), (B(2*t+8, g+8), B(2*t+9, g+8))]
for DH in (64, 128):
    QT, KT = 64, 128; QTILE = QT*DH; DW = DH//2; CQ = DH//4
    # --- P stores: mem[addr] = ('P', q, key)
    mem = {}
    for w in range(8):
        wm, wn = w & 1, w >> 1
        for l in range(32):
            g, t = l >> 2, l & 3
            for ni in range(4):
                key = 32*wn + 8*ni; blk, col = key // DH, key % DH
                pw = 2*(blk*QTILE + swz(DH, 32*wm + g, col >> 3) + 2*t)
                for mi in range(2):
                    for r in range(2):
                        q = 32*wm + 16*mi + g + 8*r
                        a = pw + (16*mi + 8*r)*2*DH
                        for e in range(2):
                            assert a + 2*e not in mem
                            mem[a + 2*e] = (q, 32*wn + 8*ni + 2*t + e)
    assert len(mem) == 64*128 and max(mem) < 64*128*2
    # --- P^T as .trans A (dV / dK): warp (wk = w >> 1), mk, kq
    for w in range(8):
        wk = w >> 1
        for mk in range(2):
            c2 = 2*wk + mk
            for kq in range(4):
                addrs = [(c2 // (DH//16))*(QTILE*2) + lane_off(DH, l, True, c2 % (DH//16)) + 32*kq*DH for l in range(32)]
                regs = ldsm(mem, addrs, True)
                for T in range(32):
                    exp = afrag(lambda r, c: (16*kq + c, 32*wk + 16*mk + r), T)
                    assert regs[T] == exp, (DH, w, mk, kq, T, regs[T], exp)
    # --- dS as A (dQ): rows 32wq + 16mi, key slice kk, via pslice(aA, r0, kk)
    for w in range(8):
        wq = w & 1
        for mi in range(2):
            for kk in range(8):
                addrs = []
                for l in range(32):
                    sa = Swz(DH, l, False)
                    addrs.append(sa.at(32*wq + 16*mi, kk % (DH//16)) + (kk // (DH//16))*(QTILE*2))
                regs = ldsm(mem, addrs, False)
                for T in range(32):
                    exp = afrag(lambda r, c: (32*wq + 16*mi + r, 16*kk + c), T)
                    assert regs[T] == exp, (DH, 'dsA', w, mi, kk, T)
    # --- dO / Q tile [64][DH] (load_tile swizzle) as .trans B of dV: wB[dp] + 32 kq DH
    memo = {}
    for r in range(64):
        for cidx in range(DH):
            memo[2*swz(DH, r, cidx >> 3) + 2*(cidx & 7)] = (r, cidx)
    for w in range(8):
        wd = w & 1
        for dp in range(DW//16):
            for kq in range(4):
                addrs = [lane_off(DH, l, False, (DW//16)*wd + dp) + 32*kq*DH for l in range(32)]
                regs = ldsm(memo, addrs, True)
                for T in range(32):
                    # B[k = q][n = col]: n-tile 0 = cols DW wd + 16 dp + 0..7, n-tile 8 = +8..15
                    exp = bfrag2(lambda k, n: (16*kq + k, DW*wd + 16*dp + n), T)
                    assert regs[T] == exp, (DH, 'dO', w, dp, kq, T, regs[T], exp)
    # --- K [128][DH] as .trans B of dQ: wK[np] + 32 kk DH
    memk = {}
    for r in range(128):
        for cidx in range(DH):
            memk[2*swz(DH, r, cidx >> 3) + 2*(cidx & 7)] = (r, cidx)
    for w in range(8):
        wc = w >> 1
        for np_ in range(CQ//16):
            for kk in range(8):
                addrs = [lane_off(DH, l, False, (CQ//16)*wc + np_) + 32*kk*DH for l in range(32)]
                regs = ldsm(memk, addrs, True)
                for T in range(32):
                    exp = bfrag2(lambda k, n: (16*kk + k, CQ*wc + 16*np_ + n), T)
                    assert regs[T] == exp, (DH, 'K', w, np_, kk, T)
    # --- S phase (existing patterns): Q as A via aA.at(32wm+16mi, kk), K as B via aB.at(32wn+16np, kk)
    for w in range(8):
        wm, wn = w & 1, w >> 1
        for kk in range(DH//16):
            for mi in range(2):
                regs = ldsm(memo, [Swz(DH, l, False).at(32*wm + 16*mi, kk) for l in range(32)], False)
                for T in range(32):
                    assert regs[T] == afrag(lambda r, c: (32*wm + 16*mi + r, 16*kk + c), T)
            for np_ in range(2):
                regs = ldsm(memk, [Swz(DH, l, True).at(32*wn + 16*np_, kk) for l in range(32)], False)
                for T in range(32):
                    # B[k][n] = K[key n][dh k]: b0 = (k 2t, 2t+1; n g) of n-tile 32wn+16np, b2.. of +8
                    exp = bfrag2(lambda k, n: (32*wn + 16*np_ + n, 16*kk + k), T)
                    assert regs[T] == exp, (DH, 'S-B', w, np_, kk, T, regs[T], exp)
    # --- red.v4 pairing: even lane row g cols 2t..2t+3, odd lane row g+8 cols 2t-2..2t+1
    for T in range(32):
        g, t = T >> 2, T & 3; odd = t & 1
        mine = {(g, 2*t): 'c0', (g, 2*t+1): 'c1', (g+8, 2*t): 'c2', (g+8, 2*t+1): 'c3'}
        P = T ^ 1; pg, pt = P >> 2, P & 3
        part = {(pg, 2*pt): 'c0', (pg, 2*pt+1): 'c1', (pg+8, 2*pt): 'c2', (pg+8, 2*pt+1): 'c3'}
        row = g + (8 if odd else 0); col0 = 2*t - (2 if odd else 0)
        # values sent: x = odd ? (c0, c1) : (c2, c3) of the sender
        sent = ('c0', 'c1') if (pt & 1) else ('c2', 'c3')
        got = [(pg + (0 if (pt & 1) else 8), 2*pt), (pg + (0 if (pt & 1) else 8), 2*pt + 1)]
        v = [(row, col0 + i) for i in range(4)]
        if odd: assert v[0:2] == got and v[2:4] == [(g+8, 2*t), (g+8, 2*t+1)], T
        else: assert v[2:4] == got and v[0:2] == [(g, 2*t), (g, 2*t+1)], T
    print("DH", DH, "ok")
