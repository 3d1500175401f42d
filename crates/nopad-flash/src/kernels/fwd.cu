// fwd.cu: varlen causal FlashAttention forward on tensor cores (mma.sync m16n8k16, bf16 -> fp32).
//
// Computes, per sequence (rows seq_start..seq_start+L) and query head h (kv head h / G):
//   out[t, h, :] = softmax_causal(scale * q k^T) v,  lse[h, t] = ln sum_j exp(scale * q_t . k_j)
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16 (q heads, then k heads, then v heads per row);
//         out [N, H * DH] bf16; lse [H, N] fp32 natural log; tiles int4 {seq_start, L, m, pad}
//         with m counted in BR-row tiles; a packed tile (m < 0: several short sequences, at most
//         64 rows) is one diagonal tile whose row r may only see keys from
//         segs[64 (-m - 1) + r] on (block-diagonal mask).
// Geometry: 1-D grid of tiles x heads, heads fastest (tile = blockIdx.x / H), so a tile's heads
// run adjacently and GQA groups share K/V in L2. 128 threads = 4 warps; each warp owns WM
// m16 row blocks (16 WM query rows), so BR = 64 WM; K/V tiles of BC = 64 keys. With WM = 2
// each K/V fragment read from smem feeds two MMAs, halving shared-memory traffic per FLOP (FA2's
// 128 x 64 tile, 32 rows per warp; no spills since the ldmatrix addresses come from four
// per-lane offsets, common.cuh SwzAddr). WM = 1 (the short-sequence kernel) skips the MMAs of
// 16-key blocks that are all masked for a warp (diagonal and packed tiles, rows past L). Q, K, V one swizzled smem tile each; V_n loads during Q K_n^T + softmax,
// K_{n+1} during P V_n (FA2's order). Scores stay in registers and become the A operand of
// P V. Online softmax in raw score units with exp2 folding (c = scale * log2 e).
// Accumulation: fp32 (scores, O, row sums); P is rounded to bf16 for the P V product.
// Sliding window (WIN, the `flash_fwd_win` entry points, WM = 1 only): row i also needs
// j > i - W. Only i - j matters, so packed tiles apply it in their local rows as they are.
// Key tiles before the first row's window are never visited (n starts at n_lo); a tile whose
// first key is outside the last row's window straddles the edge and takes the elementwise mask
// like a diagonal tile; 16-key blocks outside every window of a warp's rows skip their MMAs.
// Work saved: a 64-row query tile m visits min(m + 1, ~W / 64 + 2) key tiles instead of m + 1,
// so a sequence of L tokens costs ~(L^2 - (L - W)^2) / 2 query-key pairs instead of L^2 / 2
// (L = 8192, W = 4096: 6240 key-tile visits against 8256, 24% fewer FLOPs).

#define FWD_THREADS 128
// 1: V_0 is copied together with Q and K_0 at the start (0: after the first barrier, as run 4).
#define FWD_PREFETCH_V0 1

template <int DH, int WM, bool WIN>
__device__ __forceinline__ void flash_fwd(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ out,
                                          float* __restrict__ lse, const int4* __restrict__ tiles,
                                          const int* __restrict__ segs, int H, int Hkv, int N,
                                          float scale, int window) {
    constexpr int BR = 64 * WM, BC = 64;
    static_assert(!WIN || WM == 1, "the windowed forward is the 64-row kernel");
    // Q fragments stay in registers only at DH 64: at DH 128 they would cost 32 registers and
    // hold the 64-row kernel at 3 CTAs/SM (168 registers) instead of 4 (128).
    constexpr bool Q_IN_REGS = WM == 1 && DH == 64;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    bf16_t* sQ = (bf16_t*)smem_raw;  // [BR][DH]
    bf16_t* sK = sQ + BR * DH;        // [BC][DH]
    static_assert(BC % 16 == 0, "BC must be a multiple of 16");
    bf16_t* sV = sK + BC * DH;        // [BC][DH]

    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int seq_start = tile.x, L = tile.y, m = tile.z < 0 ? 0 : tile.z;
    const int hk = h / (H / Hkv);
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const bf16_t* gQ = qkv + (long long)(seq_start + m * BR) * rs + h * DH;
    const bf16_t* gK = qkv + (long long)seq_start * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)seq_start * rs + (H + Hkv + hk) * DH;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = m * BR + warp * 16 * WM;  // first local row of this warp
    // First key tile any row of this tile sees: row m BR sees keys from m BR - W + 1 on.
    const int n_lo = WIN ? max(0, m * BR - window + 1) / BC : 0;
    const u32 sQa = smem_u32(sQ), sKa = smem_u32(sK);
    // A-pattern offsets serve Q (A operand) and V (.trans B operand): sV sits a compile-time
    // V_OFF bytes after sQ, so V needs no registers of its own.
    constexpr u32 V_OFF = (BR + BC) * DH * 2;
    SwzAddr<DH> aQ, aK;
    aQ.init(sQa, lane, false);
    aK.init(sKa, lane, true);

    load_tile<BR, DH, FWD_THREADS>(sQ, gQ, rs, L - m * BR, tid);
    load_tile<BC, DH, FWD_THREADS>(sK, gK + (long long)n_lo * BC * rs, rs, L - n_lo * BC, tid);
    cp_commit();
    if (FWD_PREFETCH_V0) {
        // V_0 as its own group, in flight with Q and K_0 (a tile of a short sequence otherwise
        // waits for two copies in a row).
        load_tile<BC, DH, FWD_THREADS>(sV, gV + (long long)n_lo * BC * rs, rs, L - n_lo * BC,
                                       tid);
        cp_commit();
    }

    float o[WM][DH / 8][4];
    float row_max[WM][2], row_sum[WM][2];
#pragma unroll
    for (int mi = 0; mi < WM; ++mi) {
#pragma unroll
        for (int i = 0; i < DH / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
        row_max[mi][0] = row_max[mi][1] = -FLASH_INF;
        row_sum[mi][0] = row_sum[mi][1] = 0.f;
    }
    u32 qf[Q_IN_REGS ? DH / 16 : 1][4];
    const float c = scale * LOG2E;
    // Key tiles n_lo .. ceil(min((m + 1) BR, L) / BC) - 1; those from n_diag on cross the
    // diagonal (or the sequence end) and need the mask, as do (WIN) those starting before the
    // last row's window, (m + 1) BR - W.
    const int n_tiles = (min((m + 1) * BR, L) + BC - 1) / BC;
    const int n_diag = m * BR / BC;
    // Block skipping (warp-uniform): m16 block mi of this warp holds rows r_lo .. r_hi (clamped
    // to L - 1) and sees keys kmin .. r_hi (kmin > 0 only in packed tiles: the first row's
    // sequence start, the smallest of the block). On tiles crossing the diagonal a 16-key block
    // outside that range is all masked: its Q K^T and P V MMAs are skipped (the mask sets its
    // scores to -inf, so P = 0 there either way). Blocks with no row < L skip everything.
    int r_hi[WM], kmin[WM];
    bool valid[WM];
#pragma unroll
    for (int mi = 0; mi < WM; ++mi) {
        int r_lo = row0 + mi * 16;
        valid[mi] = r_lo < L;
        r_hi[mi] = min(r_lo + 15, L - 1);
        kmin[mi] = (tile.z < 0 && valid[mi]) ? segs[(-tile.z - 1) * 64 + r_lo] : 0;
    }

    for (int n = n_lo; n < n_tiles; ++n) {
        if (FWD_PREFETCH_V0 && n == n_lo)
            cp_wait<1>();  // Q, K_0 landed (V_0 may still be in flight)
        else
            cp_wait<0>();
        __syncthreads();  // K_n landed; every warp finished P V_{n-1}, so sV may be refilled.
        aQ.refresh();
        aK.refresh();
        if (Q_IN_REGS && n == n_lo) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) ldsm_x4(qf[Q_IN_REGS ? kk : 0], aQ.at(warp * 16, kk));
        }
        if (!FWD_PREFETCH_V0 || n > n_lo) {
            load_tile<BC, DH, FWD_THREADS>(sV, gV + (long long)n * BC * rs, rs, L - n * BC, tid);
            cp_commit();
        }

        // need bit np: this warp must multiply 16-key block np of this tile. Only WM = 1 skips
        // (WM = 2, the long-sequence kernel, spilled with the predicated path; all = true).
        u32 need = 0;
        bool all = true;
        if (WM == 1) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                int k0 = n * BC + np * 16;
                bool nd = valid[0] && (n < n_diag || (k0 <= r_hi[0] && k0 + 15 >= kmin[0]));
                // WIN: the rows' windows together reach back to row0 - W + 1.
                if (WIN) nd = nd && k0 + 15 > row0 - window;
                need |= (u32)nd << np;
            }
            all = need == (1u << (BC / 16)) - 1;
        }
        auto needs = [&](int np) { return all || ((need >> np) & 1u); };

        float s[WM][BC / 8][4];
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
            for (int i = 0; i < BC / 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
        if (all) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[WM][4];
#pragma unroll
                for (int mi = 0; mi < WM; ++mi) {
                    if (Q_IN_REGS) {
#pragma unroll
                        for (int x = 0; x < 4; ++x) a[mi][x] = qf[Q_IN_REGS ? kk : 0][x];
                    } else {
                        ldsm_x4(a[mi], aQ.at(warp * 16 * WM + mi * 16, kk));
                    }
                }
#pragma unroll
                for (int np = 0; np < BC / 16; ++np) {
                    u32 b[4];
                    ldsm_x4(b, aK.at(np * 16, kk));
#pragma unroll
                    for (int mi = 0; mi < WM; ++mi) {
                        mma_bf16(s[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16(s[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }
        } else if (WM == 1 && need) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                u32 a[WM][4];
#pragma unroll
                for (int mi = 0; mi < WM; ++mi) {
                    if (Q_IN_REGS) {
#pragma unroll
                        for (int x = 0; x < 4; ++x) a[mi][x] = qf[Q_IN_REGS ? kk : 0][x];
                    } else {
                        ldsm_x4(a[mi], aQ.at(warp * 16 * WM + mi * 16, kk));
                    }
                }
#pragma unroll
                for (int np = 0; np < BC / 16; ++np) {
                    if (!needs(np)) continue;
                    u32 b[4];
                    ldsm_x4(b, aK.at(np * 16, kk));
#pragma unroll
                    for (int mi = 0; mi < WM; ++mi) {
                        mma_bf16(s[mi][2 * np], a[mi], b[0], b[1]);
                        mma_bf16(s[mi][2 * np + 1], a[mi], b[2], b[3]);
                    }
                }
            }
        }
        // A straddling tile (WIN) is never "all visible", even when every block is needed.
        if (n >= n_diag || (WIN && n * BC < (m + 1) * BR - window)) {
#pragma unroll
            for (int mi = 0; mi < WM; ++mi) {
                // First visible key (local row) of rows g and g + 8: 0 unless the tile is packed.
                int seg_lo[2] = {0, 0};
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int i = row0 + mi * 16 + g + 8 * r;
                    if (tile.z < 0 && i < L) seg_lo[r] = segs[(-tile.z - 1) * 64 + i];
                }
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        int i = row0 + mi * 16 + g + ((e >> 1) << 3);
                        int j = n * BC + nt * 8 + 2 * t + (e & 1);
                        if (j > i || j >= L || j < seg_lo[e >> 1] || (WIN && j <= i - window))
                            s[mi][nt][e] = -FLASH_INF;
                    }
            }
        }
        // Online softmax; rows g (r = 0) and g + 8 (r = 1) of each m16 block.
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -FLASH_INF;
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt)
                    mx = fmaxf(mx, fmaxf(s[mi][nt][2 * r], s[mi][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float m_new = fmaxf(row_max[mi][r], mx);
                float ms = m_new == -FLASH_INF ? 0.f : m_new * c;  // never -inf - (-inf)
                float alpha = fast_exp2(row_max[mi][r] * c - ms);
                row_max[mi][r] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BC / 8; ++nt) {
                    s[mi][nt][2 * r] = fast_exp2(s[mi][nt][2 * r] * c - ms);
                    s[mi][nt][2 * r + 1] = fast_exp2(s[mi][nt][2 * r + 1] * c - ms);
                    sum += s[mi][nt][2 * r] + s[mi][nt][2 * r + 1];
                }
                row_sum[mi][r] = row_sum[mi][r] * alpha + sum;
#pragma unroll
                for (int dt = 0; dt < DH / 8; ++dt) {
                    o[mi][dt][2 * r] *= alpha;
                    o[mi][dt][2 * r + 1] *= alpha;
                }
            }

        cp_wait<0>();
        __syncthreads();  // V_n landed; every warp finished Q K_n^T, so sK may be refilled.
        if (n + 1 < n_tiles)
            load_tile<BC, DH, FWD_THREADS>(sK, gK + (long long)(n + 1) * BC * rs, rs,
                                           L - (n + 1) * BC, tid);
        cp_commit();

        // P to bf16 A fragments first (the fp32 scores die here), then O += P V.
        u32 pa[WM][BC / 16][4];
#pragma unroll
        for (int mi = 0; mi < WM; ++mi)
#pragma unroll
            for (int kj = 0; kj < BC / 16; ++kj) {
                pa[mi][kj][0] = pack_bf16(s[mi][2 * kj][0], s[mi][2 * kj][1]);
                pa[mi][kj][1] = pack_bf16(s[mi][2 * kj][2], s[mi][2 * kj][3]);
                pa[mi][kj][2] = pack_bf16(s[mi][2 * kj + 1][0], s[mi][2 * kj + 1][1]);
                pa[mi][kj][3] = pack_bf16(s[mi][2 * kj + 1][2], s[mi][2 * kj + 1][3]);
            }
        if (all) {
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp)
#pragma unroll
                for (int kj = 0; kj < BC / 16; ++kj) {
                    u32 b[4];
                    ldsm_x4_t(b, aQ.at(kj * 16, dp) + V_OFF);
#pragma unroll
                    for (int mi = 0; mi < WM; ++mi) {
                        mma_bf16(o[mi][2 * dp], pa[mi][kj], b[0], b[1]);
                        mma_bf16(o[mi][2 * dp + 1], pa[mi][kj], b[2], b[3]);
                    }
                }
        } else if (WM == 1 && need) {
            // Skipped key blocks have P = 0 (masked): leaving out their MMAs is exact.
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp)
#pragma unroll
                for (int kj = 0; kj < BC / 16; ++kj) {
                    if (!needs(kj)) continue;
                    u32 b[4];
                    ldsm_x4_t(b, aQ.at(kj * 16, dp) + V_OFF);
#pragma unroll
                    for (int mi = 0; mi < WM; ++mi) {
                        mma_bf16(o[mi][2 * dp], pa[mi][kj], b[0], b[1]);
                        mma_bf16(o[mi][2 * dp + 1], pa[mi][kj], b[2], b[3]);
                    }
                }
        }
    }
    cp_wait<0>();

#pragma unroll
    for (int mi = 0; mi < WM; ++mi)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mi][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            float inv = l > 0.f ? 1.f / l : 0.f;
            int i = row0 + mi * 16 + g + 8 * r;
            if (i < L) {
                bf16_t* dst = out + (long long)(seq_start + i) * H * DH + h * DH + 2 * t;
#pragma unroll
                for (int dt = 0; dt < DH / 8; ++dt)
                    *(u32*)(dst + dt * 8) = pack_bf16(o[mi][dt][2 * r] * inv, o[mi][dt][2 * r + 1] * inv);
                if (t == 0)
                    lse[(long long)h * N + seq_start + i] =
                        l > 0.f ? row_max[mi][r] * scale + logf(l) : FLASH_INF;
            }
        }
}

// MINB: CTAs per SM the register allocation must allow (ptxas 13.0, no spills at these caps):
// DH 64 WM 1: 128 registers, 4 CTAs/SM; DH 128 WM 1 (Q read from smem): 128, 4 CTAs/SM, a few
// spilled row statistics (72 B; with Q in registers 168 at 3 CTAs/SM, 216 uncapped). Run 4a:
// 4 vs 3 CTAs/SM (DH 64) and 3 vs 2 (DH 128) gave +19% and +23% on 500 x U[8,256].
#define FWD_ENTRY(DH, WM, NAME, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS, MINB)                            \
        NAME(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles, const int* segs,   \
             int H, int Hkv, int N, float scale) {                                             \
        flash_fwd<DH, WM, false>(qkv, out, lse, tiles, segs, H, Hkv, N, scale, 0);             \
    }
// The windowed 64-row kernels: one more parameter, the window W >= 1 (the same MINB).
#define FWD_WIN_ENTRY(DH, NAME, MINB)                                                          \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS, MINB)                            \
        NAME(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles, const int* segs,   \
             int H, int Hkv, int N, float scale, int window) {                                 \
        flash_fwd<DH, 1, true>(qkv, out, lse, tiles, segs, H, Hkv, N, scale, window);          \
    }

FWD_ENTRY(64, 1, flash_fwd_64, 4)
FWD_ENTRY(128, 1, flash_fwd_128, 4)
FWD_ENTRY(64, 2, flash_fwd_br128_64, 1)
FWD_ENTRY(128, 2, flash_fwd_br128_128, 1)
FWD_WIN_ENTRY(64, flash_fwd_win_64, 4)
FWD_WIN_ENTRY(128, flash_fwd_win_128, 4)
