// bwd_seq.cu: varlen causal FlashAttention backward for mid-length sequences: one CTA per
// (sequence, kv head) does all of that sequence's work for the group, 5 matmuls per step,
// deterministic, no atomics and no dQ recompute (mma.sync).
//
// Computes, per sequence (TILE < L <= BackwardConfig::seq_max, never packed) and kv head hk,
// for each key tile n (keys j = 64n .. 64n+63), each query head h of hk's group and each query
// tile m >= n (rows i = 64m .. 64m+63):
//   dV_j += P_ij dO_i,  dK_j += dS_ij Q_i  (scale applied once at the end),  dQ_i += dS_ij K_j
// with P_ij = exp2(scale log2e q_i.k_j - lse2_i), dP_ij = dO_i . V_j, dS = P (dP - D).
// dQ of query tile m collects key tiles n = 0 .. m in this CTA, in that order: the partial sums
// go to dqacc [H, Tpad, DH] fp32 with plain loads and stores (each element is always handled by
// the same thread, so program order is enough), and the diagonal step n = m, the last one,
// adds the partial, scales and writes bf16 dQ. So dQ is bitwise reproducible and costs one
// matmul, not the three of bwd_dq.cu's recompute.
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16; d_out [N, H * DH] bf16; lse2, D [H, Tpad] fp32
//         padded (bwd_prep.cu over this kernel's query tiles); d_qkv [N, (H + 2 Hkv) * DH]
//         bf16, all three parts of this sequence's rows written; dqacc [H, Tpad, DH] fp32
//         scratch (never needs zeroing); seqs int4 {seq_start, L, nq, pad}, most work first.
// Geometry: 1-D grid of sequences x Hkv (heads fastest); 256 threads = 8 warps; 64-key tiles,
// so a step is a 64 x 64 block and the accumulators split 8 ways (about 128 registers, 2 CTAs
// of 8 warps per SM: twice the warps of bwd_dkdv.cu / bwd_dq.cu at Dh 128). Per step:
//   S = Q K^T, dP = dO V^T [64 q x 64 keys]: warp (wm = w & 3, wn = w >> 2) owns queries
//     16wm..+15 x keys 32wn..+31; P (bf16, kept in registers) and dS = P (dP - D) go to smem;
//   barrier;
//   dV += P^T dO, dK += dS^T Q [64 keys x DH]: warp (wk = w >> 1, wd = w & 1) owns keys
//     16wk..+15 x columns (DH/2) wd..; A = P^T / dS^T via ldmatrix.trans of [q][key];
//   dQ += dS K [64 q x DH]: warp (wq = w & 3, wc = w >> 2) owns queries 16wq..+15 x columns
//     (DH/2) wc.. .
// Q, dO, lse2 and D stream through a 2-stage cp.async ring (the next step's copy is issued
// right after a step's first barrier). K_n, V_n are loaded when n changes, after a barrier, with
// the latency exposed (n changes nq - 1 times per CTA); dK_n, dV_n are written then.
// Masking: only the diagonal step m = n has masked keys (j > i; keys >= L occur only there);
// warps whose 16 x 32 block is all masked skip its MMAs. Rows >= L: Q and dO are zero-filled and
// lse2 = +inf, so P = dS = 0 there.
// Accumulation: fp32 (S, dP, dK, dV, dQ); P and dS rounded to bf16 as MMA operands.
// Shared memory: K, V [64][DH] + Q, dO [2][64][DH] + P, dS [64][64] bf16 + lse2, D [2][64] fp32
// = 65 KB (DH 64), 113 KB (DH 128).
// Uses lane_off, st_shared_u32 from bwd_long.cu (same module, compiled before this file).

#define SEQ_THREADS 256

template <int DH>
__device__ __forceinline__ void flash_bwd_seq(const bf16_t* __restrict__ qkv,
                                              const bf16_t* __restrict__ d_out,
                                              const float* __restrict__ lse2,
                                              const float* __restrict__ Dg,
                                              bf16_t* __restrict__ d_qkv,
                                              const int4* __restrict__ seqs,
                                              float* __restrict__ dqacc, int H, int Hkv,
                                              int Tpad, float scale) {
    constexpr int T = 64;
    constexpr int TILE = T * DH;  // elements of one [64][DH] tile
    constexpr int DW = DH / 2;    // dK / dV / dQ columns per warp
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sK = (bf16_t*)smem_raw;  // [64][DH]
    bf16_t* sV = sK + TILE;          // [64][DH]
    bf16_t* sQ = sV + TILE;          // [2][64][DH]
    bf16_t* sdO = sQ + 2 * TILE;     // [2][64][DH]
    bf16_t* sP = sdO + 2 * TILE;     // [64 q][64 keys], swizzled as a [64][64] tile
    bf16_t* sS = sP + T * T;         // dS, same layout
    float* sL = (float*)(sS + T * T);  // [2][64]
    float* sD = sL + 2 * T;            // [2][64]

    const int hk = blockIdx.x % Hkv;
    const int4 sq = seqs[blockIdx.x / Hkv];
    const int seq_start = sq.x, L = sq.y, nq = sq.z, pad = sq.w;
    const int G = H / Hkv;
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const float c = scale * LOG2E;

    // Steps run n = 0 .. nq-1, then the group's heads, then m = n .. nq-1.
    auto load_kv = [&](int n) {
        const bf16_t* gK = qkv + (long long)(seq_start + n * T) * rs + (H + hk) * DH;
        const bf16_t* gV = qkv + (long long)(seq_start + n * T) * rs + (H + Hkv + hk) * DH;
        load_tile<T, DH, SEQ_THREADS>(sK, gK, rs, L - n * T, tid);
        load_tile<T, DH, SEQ_THREADS>(sV, gV, rs, L - n * T, tid);
    };
    auto load_step = [&](int h, int m, int stage) {
        const bf16_t* gQ = qkv + (long long)(seq_start + m * T) * rs + h * DH;
        const bf16_t* gO = d_out + (long long)(seq_start + m * T) * ors + h * DH;
        load_tile<T, DH, SEQ_THREADS>(sQ + stage * TILE, gQ, rs, L - m * T, tid);
        load_tile<T, DH, SEQ_THREADS>(sdO + stage * TILE, gO, ors, L - m * T, tid);
        if (tid < 32) {
            long long p = (long long)h * Tpad + pad + m * T + (tid & 15) * 4;
            const float* src = tid < 16 ? lse2 + p : Dg + p;
            float* dst = (tid < 16 ? sL : sD) + stage * T + (tid & 15) * 4;
            cp_async16(smem_u32(dst), src, true);
        }
    };
    load_kv(0);
    load_step(hk * G, 0, 0);
    cp_commit();

    // Warp roles (see the header).
    const int wm = warp & 3, wn = warp >> 2;  // S / dP: queries 16wm.., keys 32wn..
    const int wk = warp >> 1, wd = warp & 1;  // dK / dV: keys 16wk.., columns DW wd..
    const int wq = warp & 3, wc = warp >> 2;  // dQ: queries 16wq.., columns DW wc..

    float dk[DW / 8][4], dv[DW / 8][4];
#pragma unroll
    for (int i = 0; i < DW / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    const u32 sKa = smem_u32(sK), sVa = smem_u32(sV), sPa = smem_u32(sP), sSa = smem_u32(sS);
    SwzAddr<DH> pa_, pb_;  // [64][DH] tiles: A pattern (Q, dO), B pattern (K, V)
    pa_.init(0, lane, false);
    pb_.init(0, lane, true);
    SwzAddr<64> ps_;  // the [64][64] dS tile as the A operand of dS K
    ps_.init(0, lane, false);
    // P^T / dS^T as .trans A: B pattern, key slice wk (rows 16 kq further: + 2048 kq bytes);
    // dO / Q as .trans B of dV / dK: A pattern, column slices (DW / 16) wd + dp; K as .trans B
    // of dQ: A pattern, column slices (DW / 16) wc + np (rows 16 r further: + 32 r DH bytes).
    const u32 oP = lane_off<64>(lane, true, wk);
    u32 oB[DW / 16], oK[DW / 16];
#pragma unroll
    for (int dp = 0; dp < DW / 16; ++dp) {
        oB[dp] = lane_off<DH>(lane, false, (DW / 16) * wd + dp);
        oK[dp] = lane_off<DH>(lane, false, (DW / 16) * wc + dp);
    }
    // This thread's words of P / dS: row 16wm + g (+8 r: + 1024 r bytes), keys 32wn + 8ni + 2t.
    u32 pw[4];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) pw[ni] = 2 * swz<64>(16 * wm + g, 4 * wn + ni) + 4 * t;

    // Write dK_n, dV_n (rows >= L skipped) and clear the accumulators.
    auto flush_kv = [&](int n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            int j = n * T + 16 * wk + g + 8 * r;
            if (j < L) {
                bf16_t* dK = d_qkv + (long long)(seq_start + j) * rs + (H + hk) * DH + DW * wd + 2 * t;
                bf16_t* dV = d_qkv + (long long)(seq_start + j) * rs + (H + Hkv + hk) * DH + DW * wd + 2 * t;
#pragma unroll
                for (int dt = 0; dt < DW / 8; ++dt) {
                    *(u32*)(dK + dt * 8) = pack_bf16(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
                    *(u32*)(dV + dt * 8) = pack_bf16(dv[dt][2 * r], dv[dt][2 * r + 1]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < DW / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
    };

    const int steps = G * (nq * (nq + 1) / 2);
    int n = 0, gi = 0, m = 0;  // this step
    for (int s = 0; s < steps; ++s) {
        const int stage = s & 1;
        cp_wait<0>();
        __syncthreads();  // stage s landed for every thread; every warp finished step s - 1.
        if (s > 0 && gi == 0 && m == n) {
            // First step of key tile n > 0: K_{n-1}, V_{n-1} are no longer read.
            flush_kv(n - 1);
            load_kv(n);
            cp_commit();
            cp_wait<0>();
            __syncthreads();
        }
        // The next step: m + 1, else the next head, else the next key tile.
        {
            int n2 = n, g2 = gi, m2 = m + 1;
            if (m2 == nq) {
                ++g2;
                if (g2 == G) {
                    g2 = 0;
                    ++n2;
                }
                m2 = n2;
            }
            if (s + 1 < steps) load_step(hk * G + g2, m2, stage ^ 1);
            cp_commit();
        }
        const int h = hk * G + gi;
        const u32 sQa = smem_u32(sQ + stage * TILE), sOa = smem_u32(sdO + stage * TILE);
        const float* sLs = sL + stage * T;
        const float* sDs = sD + stage * T;
        SwzAddr<DH> aA = pa_, aB = pb_;
        SwzAddr<64> aS = ps_;
        aA.refresh();
        aB.refresh();
        aS.refresh();
        u32 wP = oP, wB[DW / 16], wK[DW / 16], wpw[4];
        asm volatile("mov.b32 %0, %0;" : "+r"(wP));
#pragma unroll
        for (int i = 0; i < DW / 16; ++i) {
            wB[i] = oB[i];
            wK[i] = oK[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wB[i]));
            asm volatile("mov.b32 %0, %0;" : "+r"(wK[i]));
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            wpw[i] = pw[i];
            asm volatile("mov.b32 %0, %0;" : "+r"(wpw[i]));
        }

        // Diagonal step: key 32wn + 8ni + 2t + e is visible from row 16wm + g + 8r iff
        // 8ni + e <= jlim[r]; huge off the diagonal.
        const bool diag = m == n;
        int jlim[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) jlim[r] = diag ? 16 * wm + g + 8 * r - 32 * wn - 2 * t : (1 << 30);
        // This warp's 16 x 32 block is all masked (its first key is after its last query).
        const bool skip = diag && 32 * wn > 16 * wm + 15;

        // S = Q K^T.
        float sc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
        if (!skip) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[4];
                ldsm_x4(a, sQa + aA.at(16 * wm, kk));
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    u32 b[4];
                    ldsm_x4(b, sKa + aB.at(32 * wn + 16 * np, kk));
                    mma_bf16(sc[2 * np], a, b[0], b[1]);
                    mma_bf16(sc[2 * np + 1], a, b[2], b[3]);
                }
            }
        }
        // P = exp2(c S - lse2[q]) (0 where masked), kept as bf16 pairs and stored to smem.
        u32 pp[2][4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l2 = sLs[16 * wm + g + 8 * r];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                float p0 = fast_exp2(sc[ni][2 * r] * c - l2);
                float p1 = fast_exp2(sc[ni][2 * r + 1] * c - l2);
                p0 = 8 * ni > jlim[r] ? 0.f : p0;
                p1 = 8 * ni + 1 > jlim[r] ? 0.f : p1;
                pp[r][ni] = pack_bf16(p0, p1);
                st_shared_u32(sPa + wpw[ni] + 1024 * r, pp[r][ni]);
            }
        }
        // dP = dO V^T (reusing sc).
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
        if (!skip) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[4];
                ldsm_x4(a, sOa + aA.at(16 * wm, kk));
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    u32 b[4];
                    ldsm_x4(b, sVa + aB.at(32 * wn + 16 * np, kk));
                    mma_bf16(sc[2 * np], a, b[0], b[1]);
                    mma_bf16(sc[2 * np + 1], a, b[2], b[3]);
                }
            }
        }
        // dS = P (dP - D[q]) to smem as bf16.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float d = sDs[16 * wm + g + 8 * r];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                u32 p = pp[r][ni];
                st_shared_u32(sSa + wpw[ni] + 1024 * r,
                              pack_bf16(bf_lo(p) * (sc[ni][2 * r] - d), bf_hi(p) * (sc[ni][2 * r + 1] - d)));
            }
        }
        __syncthreads();  // P and dS complete in smem.

        // dV += P^T dO, dK += dS^T Q over the 64 queries (4 slices of 16).
#pragma unroll
        for (int kq = 0; kq < T / 16; ++kq) {
            u32 ap[4], ad[4];
            ldsm_x4_t(ap, sPa + wP + 2048 * kq);
            ldsm_x4_t(ad, sSa + wP + 2048 * kq);
#pragma unroll
            for (int dp = 0; dp < DW / 16; ++dp) {
                u32 b[4];
                ldsm_x4_t(b, sOa + wB[dp] + 32 * kq * DH);
                mma_bf16(dv[2 * dp], ap, b[0], b[1]);
                mma_bf16(dv[2 * dp + 1], ap, b[2], b[3]);
                ldsm_x4_t(b, sQa + wB[dp] + 32 * kq * DH);
                mma_bf16(dk[2 * dp], ad, b[0], b[1]);
                mma_bf16(dk[2 * dp + 1], ad, b[2], b[3]);
            }
        }

        // dQ partial [16 q][DW] = dS K over the 64 keys (4 slices of 16).
        {
            float acc[DW / 8][4];
#pragma unroll
            for (int i = 0; i < DW / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < T / 16; ++kk) {
                u32 a[4];
                ldsm_x4(a, sSa + aS.at(16 * wq, kk));
#pragma unroll
                for (int np = 0; np < DW / 16; ++np) {
                    u32 b[4];
                    ldsm_x4_t(b, sKa + wK[np] + 32 * kk * DH);
                    mma_bf16(acc[2 * np], a, b[0], b[1]);
                    mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
                }
            }
            // Rows 16wq + g + 8r, columns DW wc + 8nt + 2t (+1); rows >= L skipped.
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = m * T + 16 * wq + g + 8 * r;
                if (i < L) {
                    float* acc_p = dqacc + ((long long)h * Tpad + pad + i) * DH + DW * wc + 2 * t;
                    bf16_t* dQ = d_qkv + (long long)(seq_start + i) * rs + h * DH + DW * wc + 2 * t;
#pragma unroll
                    for (int nt = 0; nt < DW / 8; ++nt) {
                        float x = acc[nt][2 * r], y = acc[nt][2 * r + 1];
                        if (n > 0) {
                            float2 prev = *(const float2*)(acc_p + nt * 8);
                            x += prev.x;
                            y += prev.y;
                        }
                        if (diag)
                            *(u32*)(dQ + nt * 8) = pack_bf16(x * scale, y * scale);
                        else
                            *(float2*)(acc_p + nt * 8) = make_float2(x, y);
                    }
                }
            }
        }

        // Advance to the next step.
        if (++m == nq) {
            if (++gi == G) {
                gi = 0;
                ++n;
            }
            m = n;
        }
    }
    cp_wait<0>();
    flush_kv(nq - 1);
}

#define SEQ_ENTRY(DH, NAME)                                                                    \
    extern "C" __global__ void __launch_bounds__(SEQ_THREADS, 2)                               \
        NAME(const bf16_t* qkv, const bf16_t* d_out, const float* lse2, const float* D,        \
             bf16_t* d_qkv, const int4* seqs, float* dqacc, int H, int Hkv, int Tpad,          \
             float scale) {                                                                    \
        flash_bwd_seq<DH>(qkv, d_out, lse2, D, d_qkv, seqs, dqacc, H, Hkv, Tpad, scale);       \
    }

SEQ_ENTRY(64, flash_bwd_seq_64)
SEQ_ENTRY(128, flash_bwd_seq_128)
