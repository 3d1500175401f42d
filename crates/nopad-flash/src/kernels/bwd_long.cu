// bwd_long.cu: varlen causal FlashAttention backward for long sequences in FA2's layout
// (mma.sync): 128-key tiles, 8 warps, P and dS through shared memory.
//
// Computes, per sequence (at least plan::AUTO_WIDE_MIN tokens, never packed), kv head hk and key
// tile n (keys j = 128n .. 128n+127):
//   dV_j = sum_{h in group(hk)} sum_{i >= j} P_ij dO_i
//   dK_j = scale * sum_{h in group(hk)} sum_{i >= j} P_ij (dP_ij - D_i) Q_i
// and, when ATOMIC, each (query head h, query tile m) step's dQ partial
//   dqacc[h, i] += sum_{j in tile n} dS_ij K_j     (i = 64m .. 64m+63; red.global.add.v4.f32)
// with P_ij = exp2(scale log2e q_i.k_j - lse2_i), dP_ij = dO_i . V_j, dS = P (dP - D).
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16; d_out [N, H * DH] bf16; lse2, D [H, Tpad] fp32 padded
//         (bwd_prep.cu or the fused dQ kernel); d_qkv [N, (H + 2 Hkv) * DH] bf16, this kernel
//         writes the k and v parts; dqacc [H, Tpad, DH] fp32 (ATOMIC: zeroed by bwd_prep,
//         scaled and converted by bwd_convert); tiles int4 {seq_start, L, n, pad} with n in
//         128-key units, ordered by cost.
// Geometry: 1-D grid of key tiles x Hkv, heads fastest; 256 threads = 8 warps. K_n, V_n
// [128][DH] stay in smem; (query head, 64-row query tile m >= 2n) steps stream Q, dO, lse2, D
// through a 2-stage cp.async ring (the next step's copy is issued right after the step's first
// barrier, so it has the whole step to land). Per step, FA2's warp layouts:
//   S = Q K^T and dP = dO V^T [64 q x 128 keys]: warp (wm = w & 1, wn = w >> 1) owns queries
//     32wm..+31 x keys 32wn..+31; P and dS = P (dP - D) go to smem as bf16 [q][key];
//   barrier;
//   dV += P^T dO and dK += dS^T Q [128 keys x DH]: warp (wk = w >> 1, wd = w & 1) owns keys
//     32wk..+31 x columns (DH/2) wd..; A = P^T / dS^T via ldmatrix.trans of [q][key];
//   dQ = dS K [64 q x DH] (ATOMIC): warp (wq = w & 1, wc = w >> 1) owns queries 32wq..+31 x
//     columns (DH/4) wc..; pairs of lanes exchange one value so each adds 16 bytes at once.
// Two barriers per step: the top one also separates a step's reads of P, dS and the stage from
// the next step's writes. The GQA group sum happens in registers, so dK/dV are deterministic;
// ATOMIC = false (dK, dV only) serves the deterministic backward, dQ then comes from bwd_dq.cu.
// Masking: only steps m in {2n, 2n+1} cross the diagonal (keys >= L occur only there, and
// j > i covers them); warps whose 32 x 32 S block is all masked skip its MMAs.
// Accumulation: fp32 (S, dP, dK, dV, dQ); P and dS rounded to bf16 as MMA operands.
// Shared memory: K, V [128][DH] + Q, dO [2][64][DH] + P, dS [64][128] bf16 + lse2, D [2][64]
// fp32 = 97 KB (DH 64), 161 KB (DH 128): one CTA (8 warps) per SM, as FA2.

#define LONG_THREADS 256

// Byte offset, for lane l, of 16-column slice c2 (any value, also warp-dependent) of rows 0..15
// of a swizzled [rows][DH] tile: ldmatrix A pattern (rows l & 15, chunk bit l >> 4) or B pattern
// (rows (l & 7) + 8 (l >> 4), chunk bit (l >> 3) & 1). Adding 16 r bytes * DH * 2 (r integer)
// moves it down 16 r rows (the swizzle depends on row & 7 only).
__device__ __forceinline__ void st_shared_u32(u32 addr, u32 v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ u32 ld_shared_u32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

template <int DH>
__device__ __forceinline__ u32 lane_off(int l, bool b_pattern, int c2) {
    int row = b_pattern ? (l & 7) + ((l >> 4) << 3) : (l & 15);
    int bit = b_pattern ? ((l >> 3) & 1) : (l >> 4);
    return 2 * swz<DH>(row, 2 * c2 + bit);
}

template <int DH, bool ATOMIC>
__device__ __forceinline__ void flash_bwd_long(const bf16_t* __restrict__ qkv,
                                               const bf16_t* __restrict__ d_out,
                                               const float* __restrict__ lse2,
                                               const float* __restrict__ Dg,
                                               bf16_t* __restrict__ d_qkv,
                                               const int4* __restrict__ tiles,
                                               float* __restrict__ dqacc, int H, int Hkv,
                                               int Tpad, float scale) {
    constexpr int KT = 128, QT = 64;
    constexpr int QTILE = QT * DH;  // elements of one [64][DH] tile
    // [64 q][128 keys] bf16 as 128 / DH swizzled [64][DH] column blocks, so the DH tiles' lane
    // offsets (SwzAddr<DH>) address it too.
    constexpr int PBLK = 128 / DH;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sK = (bf16_t*)smem_raw;  // [128][DH]
    bf16_t* sV = sK + KT * DH;       // [128][DH]
    bf16_t* sQ = sV + KT * DH;       // [2][64][DH]
    bf16_t* sdO = sQ + 2 * QTILE;    // [2][64][DH]
    bf16_t* sP = sdO + 2 * QTILE;    // [PBLK][64][DH]
    bf16_t* sS = sP + QT * 128;      // [PBLK][64][DH] (dS)
    float* sL = (float*)(sS + QT * 128);  // [2][64]
    float* sD = sL + 2 * QT;              // [2][64]

    const int hk = blockIdx.x % Hkv;
    const int4 tile = tiles[blockIdx.x / Hkv];
    const int seq_start = tile.x, L = tile.y, n = tile.z, pad = tile.w;
    const int G = H / Hkv;
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nq = (L + QT - 1) / QT;
    const int m0 = 2 * n;  // first query tile with a query >= this tile's first key
    const int steps_per_head = nq - m0;
    const int steps = G * steps_per_head;
    const float c = scale * LOG2E;

    const bf16_t* gK = qkv + (long long)(seq_start + n * KT) * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)(seq_start + n * KT) * rs + (H + Hkv + hk) * DH;
    load_tile<KT, DH, LONG_THREADS>(sK, gK, rs, L - n * KT, tid);
    load_tile<KT, DH, LONG_THREADS>(sV, gV, rs, L - n * KT, tid);

    // Step s covers query head hk*G + s / steps_per_head, query tile m0 + s % steps_per_head.
    auto load_step = [&](int s, int stage) {
        int h = hk * G + s / steps_per_head;
        int m = m0 + s % steps_per_head;
        const bf16_t* gQ = qkv + (long long)(seq_start + m * QT) * rs + h * DH;
        const bf16_t* gO = d_out + (long long)(seq_start + m * QT) * ors + h * DH;
        load_tile<QT, DH, LONG_THREADS>(sQ + stage * QTILE, gQ, rs, L - m * QT, tid);
        load_tile<QT, DH, LONG_THREADS>(sdO + stage * QTILE, gO, ors, L - m * QT, tid);
        if (tid < 32) {
            long long p = (long long)h * Tpad + pad + m * QT + (tid & 15) * 4;
            const float* src = tid < 16 ? lse2 + p : Dg + p;
            float* dst = (tid < 16 ? sL : sD) + stage * QT + (tid & 15) * 4;
            cp_async16(smem_u32(dst), src, true);
        }
    };
    load_step(0, 0);
    cp_commit();

    // Warp roles (see the header).
    const int wm = warp & 1, wn = warp >> 1;  // S / dP: queries 32wm.., keys 32wn..
    const int wk = warp >> 1, wd = warp & 1;  // dK / dV: keys 32wk.., columns (DH/2) wd..
    const int wq = warp & 1, wc = warp >> 1;  // dQ: queries 32wq.., columns (DH/4) wc..
    constexpr int DW = DH / 2;                // dK / dV columns per warp
    constexpr int CQ = DH / 4;                // dQ columns per warp

    float dk[2][DW / 8][4], dv[2][DW / 8][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int i = 0; i < DW / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[a][i][e] = dv[a][i][e] = 0.f;

    const u32 sKa = smem_u32(sK), sVa = smem_u32(sV), sPa = smem_u32(sP), sSa = smem_u32(sS);
    // Lane offsets relative to a tile's base: A pattern (Q, dO, dS as A; dO, Q, K as .trans B)
    // and B pattern (K, V as B of Q K^T and dO V^T; P, dS as .trans A of P^T dO and dS^T Q).
    SwzAddr<DH> pa_, pb_;
    pa_.init(0, lane, false);
    pb_.init(0, lane, true);
    // Byte offset of 16-key slice c2 (compile-time) of the [64][128] P / dS layout: column
    // block c2 / (DH / 16), slice c2 % (DH / 16) inside it.
    auto pslice = [&](const SwzAddr<DH>& p, int r0, int c2) -> u32 {
        return p.at(r0, c2 % (DH / 16)) + (c2 / (DH / 16)) * (QTILE * 2);
    };
    // Per-warp lane offsets whose column slice depends on the warp (SwzAddr needs it
    // compile-time): P^T / dS^T as .trans A (B pattern, key slices 2wk + mk), dO / Q as .trans B
    // of dV / dK (A pattern, column slices (DW / 16) wd + dp), K as .trans B of dQ (A pattern,
    // column slices (CQ / 16) wc + np). Rows 16 r further: + 32 r DH bytes.
    u32 oP[2], oB[DW / 16], oK[CQ / 16];
#pragma unroll
    for (int mk = 0; mk < 2; ++mk) {
        int c2 = 2 * wk + mk;
        oP[mk] = (c2 / (DH / 16)) * (QTILE * 2) + lane_off<DH>(lane, true, c2 % (DH / 16));
    }
#pragma unroll
    for (int dp = 0; dp < DW / 16; ++dp) oB[dp] = lane_off<DH>(lane, false, (DW / 16) * wd + dp);
#pragma unroll
    for (int np = 0; np < CQ / 16; ++np) oK[np] = lane_off<DH>(lane, false, (CQ / 16) * wc + np);
    // This thread's words of P / dS: rows 32wm + 16mi + g + 8r, keys 32wn + 8ni + 2t (+1), at
    // byte offset pw[ni] + (16mi + 8r) 2 DH (the swizzle sees row & 7 = g only).
    u32 pw[4];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        int key = 32 * wn + 8 * ni;
        int blk = key / DH, col = key % DH;
        pw[ni] = 2 * (blk * QTILE + swz<DH>(32 * wm + g, col >> 3) + 2 * t);
    }

    for (int s = 0; s < steps; ++s) {
        const int stage = s & 1;
        cp_wait<0>();
        __syncthreads();  // stage s landed for every thread; every warp finished step s - 1.
        if (s + 1 < steps) load_step(s + 1, stage ^ 1);
        cp_commit();
        const int h = hk * G + s / steps_per_head;
        const int m = m0 + s % steps_per_head;
        const u32 sQa = smem_u32(sQ + stage * QTILE), sOa = smem_u32(sdO + stage * QTILE);
        const float* sLs = sL + stage * QT;
        const float* sDs = sD + stage * QT;
        SwzAddr<DH> aA = pa_, aB = pb_;
        aA.refresh();
        aB.refresh();
        u32 wP[2], wB[DW / 16], wK[CQ / 16];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            wP[i] = oP[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wP[i]));
        }
#pragma unroll
        for (int i = 0; i < DW / 16; ++i) {
            wB[i] = oB[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wB[i]));
        }
#pragma unroll
        for (int i = 0; i < CQ / 16; ++i) {
            wK[i] = oK[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wK[i]));
        }

        // Diagonal steps (m = 2n, 2n + 1): key j of this warp is visible from query i iff
        // j <= i. jlim[mi][r] = i - (first key of this thread's column pair), so key offset o
        // (compile-time) is masked iff o > jlim; huge off the diagonal.
        const bool diag = m <= 2 * n + 1;
        const int key0 = n * KT + 32 * wn + 2 * t;
        int jlim[2][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                int i = m * QT + 32 * wm + 16 * mi + g + 8 * r;
                jlim[mi][r] = diag ? i - key0 : (1 << 30);
            }
        // This warp's 32 x 32 block is all masked (its first key is after its last query).
        const bool skip = diag && n * KT + 32 * wn > m * QT + 32 * wm + 31;

        // S = Q K^T.
        float sc[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[mi][i][0] = sc[mi][i][1] = sc[mi][i][2] = sc[mi][i][3] = 0.f;
        if (!skip) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) ldsm_x4(a[mi], sQa + aA.at(32 * wm + 16 * mi, kk));
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    u32 b[4];
                    ldsm_x4(b, sKa + aB.at(32 * wn + 16 * np, kk));
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        mma_bf16(sc[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16(sc[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }
        }
        // P = exp2(c S - lse2[q]) (0 where masked; lse2 = +inf on rows >= L gives 0), to smem
        // as bf16 (read back by this thread for dS, so no registers hold it across dP).
        u32 wpw[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            wpw[i] = pw[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wpw[i]));
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int q = 32 * wm + 16 * mi + g + 8 * r;
                const float l2 = sLs[q];
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    float p0 = fast_exp2(sc[mi][ni][2 * r] * c - l2);
                    float p1 = fast_exp2(sc[mi][ni][2 * r + 1] * c - l2);
                    p0 = 8 * ni > jlim[mi][r] ? 0.f : p0;
                    p1 = 8 * ni + 1 > jlim[mi][r] ? 0.f : p1;
                    st_shared_u32(sPa + wpw[ni] + (16 * mi + 8 * r) * 2 * DH, pack_bf16(p0, p1));
                }
            }
        // dP = dO V^T (reusing sc).
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[mi][i][0] = sc[mi][i][1] = sc[mi][i][2] = sc[mi][i][3] = 0.f;
        if (!skip) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) ldsm_x4(a[mi], sOa + aA.at(32 * wm + 16 * mi, kk));
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    u32 b[4];
                    ldsm_x4(b, sVa + aB.at(32 * wn + 16 * np, kk));
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        mma_bf16(sc[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16(sc[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }
        }
        // dS = P (dP - D[q]) to smem as bf16.
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int q = 32 * wm + 16 * mi + g + 8 * r;
                const float d = sDs[q];
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const u32 off = wpw[ni] + (16 * mi + 8 * r) * 2 * DH;
                    u32 p = ld_shared_u32(sPa + off);
                    st_shared_u32(sSa + off, pack_bf16(bf_lo(p) * (sc[mi][ni][2 * r] - d),
                                                       bf_hi(p) * (sc[mi][ni][2 * r + 1] - d)));
                }
            }
        __syncthreads();  // P and dS complete in smem.

        // dV += P^T dO, dK += dS^T Q over the 64 queries (4 slices of 16).
#pragma unroll
        for (int kq = 0; kq < QT / 16; ++kq) {
            u32 ap[2][4], ad[2][4];
#pragma unroll
            for (int mk = 0; mk < 2; ++mk) {
                ldsm_x4_t(ap[mk], sPa + wP[mk] + 32 * kq * DH);
                ldsm_x4_t(ad[mk], sSa + wP[mk] + 32 * kq * DH);
            }
#pragma unroll
            for (int dp = 0; dp < DW / 16; ++dp) {
                u32 b[4];
                ldsm_x4_t(b, sOa + wB[dp] + 32 * kq * DH);
#pragma unroll
                for (int mk = 0; mk < 2; ++mk) {
                    mma_bf16(dv[mk][2 * dp], ap[mk], b[0], b[1]);
                    mma_bf16(dv[mk][2 * dp + 1], ap[mk], b[2], b[3]);
                }
                ldsm_x4_t(b, sQa + wB[dp] + 32 * kq * DH);
#pragma unroll
                for (int mk = 0; mk < 2; ++mk) {
                    mma_bf16(dk[mk][2 * dp], ad[mk], b[0], b[1]);
                    mma_bf16(dk[mk][2 * dp + 1], ad[mk], b[2], b[3]);
                }
            }
        }

        if (ATOMIC) {
            // dQ[32 q][CQ] = dS K over the 128 keys (8 slices of 16); rows >= L are skipped.
            float acc[2][CQ / 8][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int i = 0; i < CQ / 8; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KT / 16; ++kk) {
                u32 a[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) ldsm_x4(a[mi], sSa + pslice(aA, 32 * wq + 16 * mi, kk));
#pragma unroll
                for (int np = 0; np < CQ / 16; ++np) {
                    u32 b[4];
                    ldsm_x4_t(b, sKa + wK[np] + 32 * kk * DH);
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        mma_bf16(acc[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16(acc[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }
            // Lanes t, t ^ 1 pair up: the even one adds row g, columns 2t .. 2t + 3, the odd one
            // row g + 8, columns 2t - 2 .. 2t + 1 (one 16-byte red each). The shuffles run in
            // every lane; only the reds of m16 blocks past the sequence end are left out.
            const bool odd = t & 1;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int q0 = m * QT + 32 * wq + 16 * mi;  // first local row of this m16 block
                const bool live = q0 < L;
                float* dst = dqacc + ((long long)h * Tpad + pad + q0 + g + (odd ? 8 : 0)) * DH +
                             CQ * wc + 2 * t - (odd ? 2 : 0);
#pragma unroll
                for (int nt = 0; nt < CQ / 8; ++nt) {
                    float x0 = odd ? acc[mi][nt][0] : acc[mi][nt][2];
                    float x1 = odd ? acc[mi][nt][1] : acc[mi][nt][3];
                    float y0 = __shfl_xor_sync(0xffffffffu, x0, 1);
                    float y1 = __shfl_xor_sync(0xffffffffu, x1, 1);
                    float v0 = odd ? y0 : acc[mi][nt][0], v1 = odd ? y1 : acc[mi][nt][1];
                    float v2 = odd ? acc[mi][nt][2] : y0, v3 = odd ? acc[mi][nt][3] : y1;
                    if (live) red_add_v4(dst + nt * 8, v0, v1, v2, v3);
                }
            }
        }
    }
    cp_wait<0>();

#pragma unroll
    for (int mk = 0; mk < 2; ++mk)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            int j = n * KT + 32 * wk + 16 * mk + g + 8 * r;
            if (j < L) {
                bf16_t* dK = d_qkv + (long long)(seq_start + j) * rs + (H + hk) * DH + DW * wd + 2 * t;
                bf16_t* dV = d_qkv + (long long)(seq_start + j) * rs + (H + Hkv + hk) * DH + DW * wd + 2 * t;
#pragma unroll
                for (int dt = 0; dt < DW / 8; ++dt) {
                    *(u32*)(dK + dt * 8) = pack_bf16(dk[mk][dt][2 * r] * scale, dk[mk][dt][2 * r + 1] * scale);
                    *(u32*)(dV + dt * 8) = pack_bf16(dv[mk][dt][2 * r], dv[mk][dt][2 * r + 1]);
                }
            }
        }
}

#define LONG_ENTRY(DH, NAME, ATOMIC)                                                          \
    extern "C" __global__ void __launch_bounds__(LONG_THREADS, 1)                              \
        NAME(const bf16_t* qkv, const bf16_t* d_out, const float* lse2, const float* D,        \
             bf16_t* d_qkv, const int4* tiles, float* dqacc, int H, int Hkv, int Tpad,         \
             float scale) {                                                                    \
        flash_bwd_long<DH, ATOMIC>(qkv, d_out, lse2, D, d_qkv, tiles, dqacc, H, Hkv, Tpad,     \
                                   scale);                                                     \
    }

LONG_ENTRY(64, flash_bwd_long_64, false)
LONG_ENTRY(128, flash_bwd_long_128, false)
LONG_ENTRY(64, flash_bwd_long_dq_64, true)
LONG_ENTRY(128, flash_bwd_long_dq_128, true)
