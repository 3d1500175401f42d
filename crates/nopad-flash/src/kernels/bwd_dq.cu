// bwd_dq.cu: varlen causal FlashAttention backward, dQ over query tiles with recompute (mma.sync).
//
// Computes, per sequence, query head h and query tile m (rows i = 64m .. 64m+63):
//   dQ_i = scale * sum_{j <= i} P_ij (dP_ij - D_i) K_j
// with P_ij = exp2(scale log2e q_i.k_j - lse2_i) and dP_ij = dO_i . V_j recomputed. No atomics:
// each dQ row is owned by one warp, so the result is bitwise deterministic.
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16; d_out [N, H * DH] bf16; lse2, D [H, Tpad] fp32 padded;
//         d_qkv [N, (H + 2 Hkv) * DH] bf16, this kernel writes the q part;
//         tiles int4 {seq_start, L, m, pad} (the forward's list; m < 0: packed tile, row r sees
//         keys from segs[64 (-m - 1) + r] on).
// Geometry: 1-D grid of tiles x heads, heads fastest (tile = blockIdx.x / H); 128 threads =
// 4 warps x 16 query rows; Q and dO one smem tile each, K_n, V_n through a 2-stage cp.async
// ring. S = Q K^T and dP = dO V^T with B = K/V rows; dS stays in registers as the A operand of
// dS K (B = K via ldmatrix.trans).
// Accumulation: fp32; P and dS rounded to bf16 as MMA operands.
// Shared memory: 6 [64][DH] bf16 tiles = 48 KB (DH 64), 96 KB (DH 128).
// Sliding window (WIN, `flash_bwd_dq_win`): also j > i - W, as in fwd.cu: key tiles from n_lo
// (the first row's window) on, the elementwise mask on the diagonal tile and on tiles that
// straddle the last row's window edge, 16-key blocks outside every row's window of a warp
// skipped. Work: min(m + 1, ~W / 64 + 2) key tiles per query tile instead of m + 1.

#define DQ_THREADS 128

template <int DH, bool WIN>
__device__ __forceinline__ void flash_bwd_dq(const bf16_t* __restrict__ qkv,
                                             const bf16_t* __restrict__ d_out,
                                             float* __restrict__ lse2, float* __restrict__ Dg,
                                             bf16_t* __restrict__ d_qkv,
                                             const int4* __restrict__ tiles,
                                             const int* __restrict__ segs,
                                             const bf16_t* __restrict__ out,
                                             const float* __restrict__ lse, int H, int Hkv,
                                             int N, int Tpad, float scale, int window) {
    constexpr int TILE = 64 * DH;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sQ = (bf16_t*)smem_raw;
    bf16_t* sdO = sQ + TILE;
    bf16_t* sK = sdO + TILE;   // [2][64][DH]
    bf16_t* sV = sK + 2 * TILE;  // [2][64][DH]

    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int seq_start = tile.x, L = tile.y, m = tile.z < 0 ? 0 : tile.z, pad = tile.w;
    const int hk = h / (H / Hkv);
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const float c = scale * LOG2E;
    // First key tile any row of this tile sees (row 64 m sees keys from 64 m - W + 1 on).
    const int n_lo = WIN ? max(0, m * 64 - window + 1) >> 6 : 0;

    const bf16_t* gK = qkv + (long long)seq_start * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)seq_start * rs + (H + Hkv + hk) * DH;
    load_tile<64, DH, DQ_THREADS>(sQ, qkv + (long long)(seq_start + m * 64) * rs + h * DH, rs,
                                  L - m * 64, tid);
    load_tile<64, DH, DQ_THREADS>(sdO, d_out + (long long)(seq_start + m * 64) * ors + h * DH, ors,
                                  L - m * 64, tid);
    load_tile<64, DH, DQ_THREADS>(sK, gK + (long long)n_lo * 64 * rs, rs, L - n_lo * 64, tid);
    load_tile<64, DH, DQ_THREADS>(sV, gV + (long long)n_lo * 64 * rs, rs, L - n_lo * 64, tid);
    // out != nullptr: this kernel computes D and lse2 of its rows (and stores them for the dK/dV
    // kernel, which then runs after it): O goes to the K/V ring's second K stage, free until
    // the loop's first prefetch.
    bf16_t* sO = sK + TILE;
    if (out != nullptr)
        load_tile<64, DH, DQ_THREADS>(sO, out + (long long)(seq_start + m * 64) * ors + h * DH,
                                      ors, L - m * 64, tid);
    cp_commit();

    float l2[2], dd[2];
    int seg_lo[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (tile.z < 0) seg_lo[r] = segs[(-tile.z - 1) * 64 + warp * 16 + g + 8 * r];
    if (out != nullptr) {
        cp_wait<0>();
        __syncthreads();  // dO and O landed for every thread.
        // Row warp * 16 + (lane >> 1): lanes 2i, 2i + 1 each sum half of its DH products
        // (rows >= L were zero-filled, so their D is 0).
        const int row = warp * 16 + (lane >> 1), half = lane & 1;
        float dsum = 0.f;
#pragma unroll
        for (int ch = 0; ch < DH / 16; ++ch) {
            int chunk = half * (DH / 16) + ch;
            uint4 a = *(const uint4*)(sdO + swz<DH>(row, chunk));
            uint4 b = *(const uint4*)(sO + swz<DH>(row, chunk));
            dsum += bf_lo(a.x) * bf_lo(b.x) + bf_hi(a.x) * bf_hi(b.x);
            dsum += bf_lo(a.y) * bf_lo(b.y) + bf_hi(a.y) * bf_hi(b.y);
            dsum += bf_lo(a.z) * bf_lo(b.z) + bf_hi(a.z) * bf_hi(b.z);
            dsum += bf_lo(a.w) * bf_lo(b.w) + bf_hi(a.w) * bf_hi(b.w);
        }
        dsum += __shfl_xor_sync(0xffffffffu, dsum, 1);
        const int i = m * 64 + row;
        const float l2v = i < L ? lse[(long long)h * N + seq_start + i] * LOG2E : FLASH_INF;
        if (half == 0) {
            long long p = (long long)h * Tpad + pad + i;
            Dg[p] = dsum;
            lse2[p] = l2v;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            dd[r] = __shfl_sync(0xffffffffu, dsum, 2 * (g + 8 * r));
            l2[r] = __shfl_sync(0xffffffffu, l2v, 2 * (g + 8 * r));
        }
        __syncthreads();  // every warp has read sO before the loop refills that stage.
    } else {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            long long p = (long long)h * Tpad + pad + m * 64 + warp * 16 + g + 8 * r;
            l2[r] = lse2[p];
            dd[r] = Dg[p];
        }
    }
    float dq[DH / 8][4];
#pragma unroll
    for (int i = 0; i < DH / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    const u32 sQa = smem_u32(sQ), sOa = smem_u32(sdO);
    // Block skipping (warp-uniform, as in fwd.cu): this warp's rows i0 .. r_hi (< L) see keys
    // kmin .. r_hi; on the diagonal step 16-key blocks outside that range are all masked (dS = 0)
    // and their MMAs are skipped. A warp with no row < L skips every MMA.
    const int i0 = m * 64 + warp * 16;
    const bool wvalid = i0 < L;
    const int r_hi = min(i0 + 15, L - 1);
    const int kmin = (tile.z < 0 && wvalid) ? segs[(-tile.z - 1) * 64 + warp * 16] : 0;
    SwzAddr<DH> pa_, pb_;  // lane offsets, A and B patterns (common.cuh)
    pa_.init(0, lane, false);
    pb_.init(0, lane, true);

    for (int n = n_lo; n <= m; ++n) {
        const int stage = (n - n_lo) & 1;
        if (n + 1 <= m) {
            load_tile<64, DH, DQ_THREADS>(sK + (stage ^ 1) * TILE, gK + (long long)(n + 1) * 64 * rs,
                                          rs, L - (n + 1) * 64, tid);
            load_tile<64, DH, DQ_THREADS>(sV + (stage ^ 1) * TILE, gV + (long long)(n + 1) * 64 * rs,
                                          rs, L - (n + 1) * 64, tid);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const u32 sKa = smem_u32(sK + stage * TILE), sVa = smem_u32(sV + stage * TILE);
        SwzAddr<DH> aA = pa_, aB = pb_;
        aA.refresh();
        aB.refresh();

        u32 need = 0;
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            int k0 = n * 64 + np * 16;
            bool nd = wvalid && (n < m || (k0 <= r_hi && k0 + 15 >= kmin));
            // WIN: the rows' windows together reach back to i0 - W + 1.
            if (WIN) nd = nd && k0 + 15 > i0 - window;
            need |= (u32)nd << np;
        }
        const bool all = need == 15u;
        // The mask applies on the diagonal tile and (WIN) on tiles that start before the last
        // row's window: such a tile is never "all visible", whatever `all` says of its MMAs.
        const bool masked = n == m || (WIN && n * 64 < (m + 1) * 64 - window);

        float s[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
        if (all) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[4], ao[4];
                ldsm_x4(a, sQa + aA.at(warp * 16, kk));
                ldsm_x4(ao, sOa + aA.at(warp * 16, kk));
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    u32 b[4];
                    ldsm_x4(b, sKa + aB.at(np * 16, kk));
                    mma_bf16(s[2 * np], a, b[0], b[1]);
                    mma_bf16(s[2 * np + 1], a, b[2], b[3]);
                    ldsm_x4(b, sVa + aB.at(np * 16, kk));
                    mma_bf16(dp[2 * np], ao, b[0], b[1]);
                    mma_bf16(dp[2 * np + 1], ao, b[2], b[3]);
                }
            }
        } else if (need) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[4], ao[4];
                ldsm_x4(a, sQa + aA.at(warp * 16, kk));
                ldsm_x4(ao, sOa + aA.at(warp * 16, kk));
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    if (!((need >> np) & 1u)) continue;
                    u32 b[4];
                    ldsm_x4(b, sKa + aB.at(np * 16, kk));
                    mma_bf16(s[2 * np], a, b[0], b[1]);
                    mma_bf16(s[2 * np + 1], a, b[2], b[3]);
                    ldsm_x4(b, sVa + aB.at(np * 16, kk));
                    mma_bf16(dp[2 * np], ao, b[0], b[1]);
                    mma_bf16(dp[2 * np + 1], ao, b[2], b[3]);
                }
            }
        }
        u32 da[4][4];  // dS as bf16 A fragments, k = keys
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int r = e >> 1;
                int i = m * 64 + warp * 16 + g + 8 * r;
                int j = n * 64 + nt * 8 + 2 * t + (e & 1);
                float p = fast_exp2(s[nt][e] * c - l2[r]);
                if (masked && (j > i || j >= L || j < seg_lo[r] || (WIN && j <= i - window)))
                    p = 0.f;
                v[e] = p * (dp[nt][e] - dd[r]);
            }
            da[nt >> 1][(nt & 1) * 2] = pack_bf16(v[0], v[1]);
            da[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16(v[2], v[3]);
        }
        if (all) {
#pragma unroll
            for (int kj = 0; kj < 4; ++kj)
#pragma unroll
                for (int dpi = 0; dpi < DH / 16; ++dpi) {
                    u32 b[4];
                    ldsm_x4_t(b, sKa + aA.at(kj * 16, dpi));
                    mma_bf16(dq[2 * dpi], da[kj], b[0], b[1]);
                    mma_bf16(dq[2 * dpi + 1], da[kj], b[2], b[3]);
                }
        } else if (need) {
            // Skipped key blocks are masked (dS = 0): leaving out their MMAs is exact.
#pragma unroll
            for (int kj = 0; kj < 4; ++kj) {
                if (!((need >> kj) & 1u)) continue;
#pragma unroll
                for (int dpi = 0; dpi < DH / 16; ++dpi) {
                    u32 b[4];
                    ldsm_x4_t(b, sKa + aA.at(kj * 16, dpi));
                    mma_bf16(dq[2 * dpi], da[kj], b[0], b[1]);
                    mma_bf16(dq[2 * dpi + 1], da[kj], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled.
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int i = m * 64 + warp * 16 + g + 8 * r;
        if (i < L) {
            bf16_t* dst = d_qkv + (long long)(seq_start + i) * rs + h * DH + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DH / 8; ++dt)
                *(u32*)(dst + dt * 8) = pack_bf16(dq[dt][2 * r] * scale, dq[dt][2 * r + 1] * scale);
        }
    }
}

// DH 64: 3 CTAs/SM (168 registers, as uncapped; 4 would need 128 and spills 56 B).
#define DQ64_MINB 3
#define DQ_ENTRY(DH, NAME, MINB)                                                              \
    extern "C" __global__ void __launch_bounds__(DQ_THREADS, MINB)                             \
        NAME(const bf16_t* qkv, const bf16_t* d_out, float* lse2, float* D, bf16_t* d_qkv,     \
             const int4* tiles, const int* segs, const bf16_t* out, const float* lse, int H,   \
             int Hkv, int N, int Tpad, float scale) {                                          \
        flash_bwd_dq<DH, false>(qkv, d_out, lse2, D, d_qkv, tiles, segs, out, lse, H, Hkv, N,  \
                                Tpad, scale, 0);                                               \
    }
// The windowed kernels: one more parameter, the window W >= 1.
#define DQ_WIN_ENTRY(DH, NAME, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(DQ_THREADS, MINB)                             \
        NAME(const bf16_t* qkv, const bf16_t* d_out, float* lse2, float* D, bf16_t* d_qkv,     \
             const int4* tiles, const int* segs, const bf16_t* out, const float* lse, int H,   \
             int Hkv, int N, int Tpad, float scale, int window) {                              \
        flash_bwd_dq<DH, true>(qkv, d_out, lse2, D, d_qkv, tiles, segs, out, lse, H, Hkv, N,   \
                               Tpad, scale, window);                                           \
    }

DQ_ENTRY(64, flash_bwd_dq_64, DQ64_MINB)
DQ_ENTRY(128, flash_bwd_dq_128, 1)
DQ_WIN_ENTRY(64, flash_bwd_dq_win_64, DQ64_MINB)
DQ_WIN_ENTRY(128, flash_bwd_dq_win_128, 1)
