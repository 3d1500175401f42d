// bwd_dkdv.cu: varlen causal FlashAttention backward, dK and dV, over key tiles (mma.sync).
//
// Computes, per sequence, kv head hk and key tile n (keys j = 64n .. 64n+63):
//   dV_j = sum_{h in group(hk)} sum_{i >= j} P_ij dO_i
//   dK_j = scale * sum_{h in group(hk)} sum_{i >= j} P_ij (dP_ij - D_i) Q_i
// with P_ij = exp2(scale log2e q_i.k_j - lse2_i), dP_ij = dO_i . V_j (recomputed here).
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16; d_out [N, H * DH] bf16; lse2, D [H, Tpad] fp32 padded
//         (written by bwd_dq.cu); d_qkv [N, (H + 2 Hkv) * DH] bf16, this kernel writes the k and v parts;
//         tiles int4 {seq_start, L, n, pad}, ordered by cost (query tiles to visit); n < 0: a
//         packed tile, query row i sees keys from segs[64 (-n - 1) + i] on.
// Geometry: 1-D grid of kv tiles x Hkv, heads fastest; NW warps (4, or 8 in the wide atomic
// kernel for long sequences: 128-key tiles), each owning 16 keys. K_n, V_n stay in smem; (query
// head, 64-row query tile) steps stream Q, dO, lse2, D through a 2-stage cp.async ring. Each
// warp computes S^T = K Q^T and dP^T = V dO^T (A from smem via ldmatrix, B = Q/dO rows), keeps
// P^T and dS^T in registers as bf16 A fragments for dV += P^T dO and dK += dS^T Q (B via
// ldmatrix.trans). The GQA group sum happens in registers, so dK/dV are deterministic.
// Only ATOMIC = false, NW = 4 has an entry point (the deterministic backward); the ATOMIC and
// NW = 8 branches served the atomic-dQ backward, which left the crate (docs/FLASH.md section 9).
// ATOMIC = true (the fast, non-deterministic backward) also computed dQ here: dS^T goes to smem
// as bf16 [key][query], each warp forms 16 query rows (x DH 4 / NW columns) of dS K in
// 32-column slices (A via ldmatrix.trans of dS^T, B = K via ldmatrix.trans) and adds them to the
// fp32 accumulator dqacc [H, Tpad, DH] with red.global.add.v4.f32 (zeroed by bwd_prep, scaled
// and converted by bwd_convert). ATOMIC = false leaves dQ to bwd_dq.cu (7 matmuls instead of 5,
// no atomics).
// Accumulation: fp32 (S, dP, dK, dV, dQ); P and dS rounded to bf16 as MMA operands.
// Shared memory: (2 + 4) [64][DH] bf16 tiles + 2 x 2 x 64 fp32 (+ 8 KB dS when ATOMIC)
// = 48.5 / 56.5 KB (DH 64), 97 / 105 KB (DH 128); NW = 8: 81 / 145 KB.
// Sliding window (WIN, `flash_bwd_dkdv_win`, deterministic NW = 4 only): key j is seen by
// queries i with j <= i < j + W, so the query tiles stop at the one holding the tile's last key
// + W - 1 (m_end); 16-query blocks beyond every key's window of a warp skip their MMAs, and the
// elementwise mask adds i - j >= W. Work: min(nt - n, ~W / 64 + 2) query tiles per key tile
// instead of nt - n.

#define BWD_THREADS 128
// Atomic dQ: 16-byte red.global.add.v4 (lanes paired by one shuffle) rather than two 8-byte ones.
#define DQ_RED_V4 1

// st = X^T[16 rows of sA (K or V) at this warp][64 rows of sB (Q or dO)], contracting DH.
// CHECK: skip 16-column blocks np whose bit in `need` is clear (they stay 0).
template <int DH, bool CHECK>
__device__ __forceinline__ void bwd_xt(float (&st)[8][4], const SwzAddr<DH>& aA,
                                       const SwzAddr<DH>& aB, u32 sA, u32 sB, int warp,
                                       u32 need) {
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
        u32 a[4];
        ldsm_x4(a, sA + aA.at(warp * 16, kk));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (CHECK && !((need >> np) & 1u)) continue;
            u32 b[4];
            ldsm_x4(b, sB + aB.at(np * 16, kk));
            mma_bf16(st[2 * np], a, b[0], b[1]);
            mma_bf16(st[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// acc[16 rows][DH] += pa[16][64 queries] * sB[64 queries][DH] (B via ldmatrix.trans).
// CHECK: skip query slices kj whose bit in `need` is clear (pa is 0 there).
template <int DH, bool CHECK>
__device__ __forceinline__ void bwd_acc_pb(float (&acc)[DH / 8][4], const u32 (&pa)[4][4],
                                           const SwzAddr<DH>& aA, u32 sB, u32 need) {
#pragma unroll
    for (int kj = 0; kj < 4; ++kj) {
        if (CHECK && !((need >> kj) & 1u)) continue;
#pragma unroll
        for (int dp = 0; dp < DH / 16; ++dp) {
            u32 b[4];
            ldsm_x4_t(b, sB + aA.at(kj * 16, dp));
            mma_bf16(acc[2 * dp], pa[kj], b[0], b[1]);
            mma_bf16(acc[2 * dp + 1], pa[kj], b[2], b[3]);
        }
    }
}

template <int DH, bool ATOMIC, int NW, bool WIN>
__device__ __forceinline__ void flash_bwd_dkdv(const bf16_t* __restrict__ qkv,
                                               const bf16_t* __restrict__ d_out,
                                               const float* __restrict__ lse2,
                                               const float* __restrict__ Dg,
                                               bf16_t* __restrict__ d_qkv,
                                               const int4* __restrict__ tiles,
                                               const int* __restrict__ segs,
                                               float* __restrict__ dqacc, int H, int Hkv,
                                               int Tpad, float scale, int window) {
    // NW warps of 16 keys: KT = 16 NW keys per CTA (64, or 128 for the wide atomic kernel).
    constexpr int KT = 16 * NW, NT = 32 * NW;
    constexpr int TILE = 64 * DH;
    static_assert(!WIN || (!ATOMIC && NW == 4), "the windowed dK/dV is the deterministic kernel");
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sK = (bf16_t*)smem_raw;
    bf16_t* sV = sK + KT * DH;
    bf16_t* sQ = sV + KT * DH;    // [2][64][DH]
    bf16_t* sdO = sQ + 2 * TILE;  // [2][64][DH]
    float* sL = (float*)(sdO + 2 * TILE);  // [2][64]
    float* sD = sL + 128;                  // [2][64]
    bf16_t* sdS = (bf16_t*)(sD + 128);     // [KT keys][64 queries], swizzled; ATOMIC only

    const int hk = blockIdx.x % Hkv;
    const int4 tile = tiles[blockIdx.x / Hkv];
    const int seq_start = tile.x, L = tile.y, n = tile.z < 0 ? 0 : tile.z, pad = tile.w;
    const int* seg = tile.z < 0 ? segs + (-tile.z - 1) * 64 : nullptr;
    const int G = H / Hkv;
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nq = (L + 63) >> 6;
    const int m0 = n * KT / 64;  // first query tile with a query >= this tile's first key
    // WIN: one past the last query tile any key of this tile is seen from; the tile's last key
    // n KT + KT - 1 is seen up to query n KT + KT - 2 + W. W is clamped to L (no query is
    // further than L - 1 from a key) so the sum stays far from overflow.
    const int m_end = WIN ? min(nq, (n * KT + KT - 2 + min(window, L)) / 64 + 1) : nq;
    const int steps_per_head = m_end - m0;
    const int steps = G * steps_per_head;
    const float c = scale * LOG2E;

    const bf16_t* gK = qkv + (long long)(seq_start + n * KT) * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)(seq_start + n * KT) * rs + (H + Hkv + hk) * DH;
    load_tile<KT, DH, NT>(sK, gK, rs, L - n * KT, tid);
    load_tile<KT, DH, NT>(sV, gV, rs, L - n * KT, tid);

    // Step s covers query head hk*G + s / steps_per_head, query tile m0 + s % steps_per_head.
    auto load_step = [&](int s, int stage) {
        int h = hk * G + s / steps_per_head;
        int m = m0 + s % steps_per_head;
        const bf16_t* gQ = qkv + (long long)(seq_start + m * 64) * rs + h * DH;
        const bf16_t* gO = d_out + (long long)(seq_start + m * 64) * ors + h * DH;
        load_tile<64, DH, NT>(sQ + stage * TILE, gQ, rs, L - m * 64, tid);
        load_tile<64, DH, NT>(sdO + stage * TILE, gO, ors, L - m * 64, tid);
        if (tid < 32) {
            long long p = (long long)h * Tpad + pad + m * 64 + (tid & 15) * 4;
            const float* src = tid < 16 ? lse2 + p : Dg + p;
            float* dst = (tid < 16 ? sL : sD) + stage * 64 + (tid & 15) * 4;
            cp_async16(smem_u32(dst), src, true);
        }
    };
    load_step(0, 0);
    cp_commit();

    float dk[DH / 8][4], dv[DH / 8][4];
#pragma unroll
    for (int i = 0; i < DH / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    const u32 sKa = smem_u32(sK), sVa = smem_u32(sV);
    // Block skipping (warp-uniform): this warp's keys j0 .. j0 + 15 are seen by queries i with
    // seg(i) <= j <= i. On the diagonal step a 16-query block q0 .. q0 + 15 with q0 + 15 < j0,
    // or (packed) seg(q0) > j0 + 15, or q0 >= L is all masked (P = dS = 0): its MMAs are
    // skipped (and its P forced to 0). A warp whose keys are all >= L skips every MMA.
    const int j0 = n * KT + warp * 16;
    const bool wvalid = j0 < L;
    // Lane offsets relative to a tile's base: A pattern (K, V as A; dO, Q as .trans B) and B
    // pattern (Q, dO as B of K Q^T and V dO^T).
    SwzAddr<DH> pa_, pb_;
    pa_.init(0, lane, false);
    pb_.init(0, lane, true);
    for (int s = 0; s < steps; ++s) {
        const int stage = s & 1;
        if (s + 1 < steps) load_step(s + 1, stage ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();  // stage s (and K, V) landed for every thread.
        const int m = m0 + s % steps_per_head;
        // Some query of tile m precedes some key of this CTA: the causal mask applies.
        const bool diag = m * 64 < n * KT + KT;
        const u32 sQa = smem_u32(sQ + stage * TILE), sOa = smem_u32(sdO + stage * TILE);
        SwzAddr<DH> aA = pa_, aB = pb_;
        aA.refresh();
        aB.refresh();
        const float* sLs = sL + stage * 64;
        const float* sDs = sD + stage * 64;
        u32 need = 0;
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            int q0 = m * 64 + np * 16;
            bool nd = wvalid && q0 < L &&
                      (!diag || (q0 + 15 >= j0 && (seg == nullptr || seg[np * 16] <= j0 + 15)));
            // WIN: query q0 is the nearest to the warp's last key j0 + 15.
            if (WIN) nd = nd && q0 - (j0 + 15) < window;
            need |= (u32)nd << np;
        }
        const bool all = need == 15u;

        // S^T[16 keys][64 queries] = K Q^T; P^T = exp2(c S^T - lse2[query]).
        float st[8][4];
        u32 pa[4][4];  // P^T as bf16 A fragments, k = queries (slice kj = queries 16kj..16kj+15)
#pragma unroll
        for (int i = 0; i < 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        if (all)
            bwd_xt<DH, false>(st, aA, aB, sKa, sQa, warp, need);
        else if (need)
            bwd_xt<DH, true>(st, aA, aB, sKa, sQa, warp, need);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int qcol = nt * 8 + 2 * t + (e & 1);
                int j = j0 + g + ((e >> 1) << 3);
                float v = fast_exp2(st[nt][e] * c - sLs[qcol]);
                bool masked = (!all && !((need >> (nt >> 1)) & 1u)) ||
                              (m * 64 < n * KT + KT && (m * 64 + qcol < j || (seg != nullptr && seg[qcol] > j))) ||
                              (WIN && m * 64 + qcol - j >= window);
                p[e] = masked ? 0.f : v;
            }
            pa[nt >> 1][(nt & 1) * 2] = pack_bf16(p[0], p[1]);
            pa[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16(p[2], p[3]);
        }
        // dV += P^T dO.
        if (all)
            bwd_acc_pb<DH, false>(dv, pa, aA, sOa, need);
        else if (need)
            bwd_acc_pb<DH, true>(dv, pa, aA, sOa, need);
        // dP^T = V dO^T; dS^T = P^T (dP^T - D[query]), reusing st's registers.
#pragma unroll
        for (int i = 0; i < 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
        if (all)
            bwd_xt<DH, false>(st, aA, aB, sVa, sOa, warp, need);
        else if (need)
            bwd_xt<DH, true>(st, aA, aB, sVa, sOa, warp, need);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            u32 p01 = pa[nt >> 1][(nt & 1) * 2], p23 = pa[nt >> 1][(nt & 1) * 2 + 1];
            float d0 = sDs[nt * 8 + 2 * t], d1 = sDs[nt * 8 + 2 * t + 1];
            pa[nt >> 1][(nt & 1) * 2] =
                pack_bf16(bf_lo(p01) * (st[nt][0] - d0), bf_hi(p01) * (st[nt][1] - d1));
            pa[nt >> 1][(nt & 1) * 2 + 1] =
                pack_bf16(bf_lo(p23) * (st[nt][2] - d0), bf_hi(p23) * (st[nt][3] - d1));
        }
        if (ATOMIC) {
            // dS^T to smem as [key][query] (16-B chunk swizzle, as a [64][64] tile).
#pragma unroll
            for (int kj = 0; kj < 4; ++kj)
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    int r = warp * 16 + g + ((x & 1) << 3);
                    int q = kj * 16 + ((x >> 1) << 3) + 2 * t;
                    *(u32*)(sdS + swz<64>(r, q >> 3) + (q & 7)) = pa[kj][x];
                }
        }
        // dK += dS^T Q.
        if (all)
            bwd_acc_pb<DH, false>(dk, pa, aA, sQa, need);
        else if (need)
            bwd_acc_pb<DH, true>(dk, pa, aA, sQa, need);
        if (ATOMIC) {
            __syncthreads();  // dS^T complete in smem.
            const int h = hk * G + s / steps_per_head;
            const u32 sSa = smem_u32(sdS);
            // Warp w adds query rows 16 (w % 4) .. + 15 of tile m, columns of group w / 4 (NW / 4
            // groups of CW columns), summed over the KT keys.
            constexpr int CW = DH * 4 / NW;
            const int rb = warp & 3, ch = warp >> 2;
            float* dst = dqacc + ((long long)h * Tpad + pad + m * 64 + rb * 16 + g) * DH +
                         ch * CW + 2 * t;
            // These 16 query rows: none < L, nothing to add. Key blocks kk with keys all >= L
            // or (diagonal) all after these queries have dS = 0 and are skipped.
            const bool qvalid = m * 64 + rb * 16 < L;
            int kk_end = min(KT / 16, (L - n * KT + 15) >> 4);
            if (diag) kk_end = min(kk_end, ((m * 64 + rb * 16 + 15 - n * KT) >> 4) + 1);
#pragma unroll 1
            for (int cs = 0; qvalid && cs < CW / 32; ++cs) {
                float acc[4][4];
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < KT / 16; ++kk) {
                    if (kk >= kk_end) break;
                    u32 a[4];
                    ldsm_x4_t(a, addr_b<64>(sSa, kk * 16, rb, lane));
#pragma unroll
                    for (int np = 0; np < 2; ++np) {
                        u32 b[4];
                        ldsm_x4_t(b, addr_bt<DH>(sKa, kk * 16, ch * (CW / 16) + cs * 2 + np, lane));
                        mma_bf16(acc[2 * np], a, b[0], b[1]);
                        mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
                    }
                }
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    float* p = dst + cs * 32 + nt * 8;
#if DQ_RED_V4
                    // Pair lanes t, t ^ 1: the even one adds row g, columns 2t .. 2t + 3, the
                    // odd one row g + 8, columns 2t - 2 .. 2t + 1: one 16-byte red each
                    // instead of two 8-byte ones.
                    const bool odd = t & 1;
                    float x0 = odd ? acc[nt][0] : acc[nt][2], x1 = odd ? acc[nt][1] : acc[nt][3];
                    float y0 = __shfl_xor_sync(0xffffffffu, x0, 1);
                    float y1 = __shfl_xor_sync(0xffffffffu, x1, 1);
                    if (odd)
                        red_add_v4(p + 8 * DH - 2, y0, y1, acc[nt][2], acc[nt][3]);
                    else
                        red_add_v4(p, acc[nt][0], acc[nt][1], y0, y1);
#else
                    red_add_v2(p, acc[nt][0], acc[nt][1]);
                    red_add_v2(p + 8 * DH, acc[nt][2], acc[nt][3]);
#endif
                }
            }
        }
        __syncthreads();  // every warp is done with this stage (and dS) before they are refilled.
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int j = j0 + g + 8 * r;
        if (j < L) {
            bf16_t* dK = d_qkv + (long long)(seq_start + j) * rs + (H + hk) * DH + 2 * t;
            bf16_t* dV = d_qkv + (long long)(seq_start + j) * rs + (H + Hkv + hk) * DH + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DH / 8; ++dt) {
                *(u32*)(dK + dt * 8) = pack_bf16(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
                *(u32*)(dV + dt * 8) = pack_bf16(dv[dt][2 * r], dv[dt][2 * r + 1]);
            }
        }
    }
}

// MINB: CTAs per SM the registers must allow. DH 64 deterministic: 3 (168 registers, as
// uncapped; 4 would need 128 and spills 132 B); DH 128: smem (97 KB) allows 2 anyway.
#define DKDV64_MINB 3
#define DKDV_ENTRY(DH, NAME, ATOMIC, MINB, NW)                                                \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB)                                \
        NAME(const bf16_t* qkv, const bf16_t* d_out, const float* lse2, const float* D,        \
             bf16_t* d_qkv, const int4* tiles, const int* segs, float* dqacc, int H, int Hkv,  \
             int Tpad, float scale) {                                                          \
        flash_bwd_dkdv<DH, ATOMIC, NW, false>(qkv, d_out, lse2, D, d_qkv, tiles, segs, dqacc,  \
                                              H, Hkv, Tpad, scale, 0);                         \
    }
// The windowed kernels: one more parameter, the window W >= 1.
#define DKDV_WIN_ENTRY(DH, NAME, MINB)                                                        \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                    \
        NAME(const bf16_t* qkv, const bf16_t* d_out, const float* lse2, const float* D,        \
             bf16_t* d_qkv, const int4* tiles, const int* segs, float* dqacc, int H, int Hkv,  \
             int Tpad, float scale, int window) {                                              \
        flash_bwd_dkdv<DH, false, 4, true>(qkv, d_out, lse2, D, d_qkv, tiles, segs, dqacc, H,  \
                                           Hkv, Tpad, scale, window);                          \
    }

DKDV_ENTRY(64, flash_bwd_dkdv_64, false, DKDV64_MINB, 4)
DKDV_ENTRY(128, flash_bwd_dkdv_128, false, 1, 4)
DKDV_WIN_ENTRY(64, flash_bwd_dkdv_win_64, DKDV64_MINB)
DKDV_WIN_ENTRY(128, flash_bwd_dkdv_win_128, 1)
