// fwd.cu: varlen causal FlashAttention forward on tensor cores (mma.sync m16n8k16, bf16 -> fp32).
//
// Computes, per sequence (rows seq_start..seq_start+L) and query head h (kv head h / G):
//   out[t, h, :] = softmax_causal(scale * q k^T) v,  lse[h, t] = ln sum_j exp(scale * q_t . k_j)
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16 (q heads, then k heads, then v heads per row);
//         out [N, H * DH] bf16; lse [H, N] fp32 natural log; tiles int4 {seq_start, L, m, pad}.
// Geometry: 1-D grid of tiles x heads, heads fastest (tile = blockIdx.x / H) so a tile's heads run adjacently (GQA groups share K/V in L2);
// 128 threads = 4 warps, each owning 16 of the tile's BR = 64 query rows; K/V tiles of BC = 64
// keys. Q, K, V each one swizzled [64][DH] smem tile (48 KB at DH = 128); V_n loads during
// Q K_n^T + softmax, K_{n+1} during P V_n (FA2's order). Scores stay in registers and become the
// A operand of P V. Online softmax in raw score units with exp2 folding (c = scale * log2 e).
// Accumulation: fp32 (scores, O, row sums); P is rounded to bf16 for the P V product.

#define FWD_BR 64
#define FWD_BC 64
#define FWD_THREADS 128

template <int DH>
__device__ __forceinline__ void flash_fwd(const bf16_t* __restrict__ qkv, bf16_t* __restrict__ out,
                                          float* __restrict__ lse, const int4* __restrict__ tiles,
                                          int H, int Hkv, int N, float scale) {
    constexpr int BR = FWD_BR, BC = FWD_BC;
    __shared__ __align__(128) bf16_t sQ[BR * DH];
    __shared__ __align__(128) bf16_t sK[BC * DH];
    __shared__ __align__(128) bf16_t sV[BC * DH];

    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int seq_start = tile.x, L = tile.y, m = tile.z;
    const int hk = h / (H / Hkv);
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const bf16_t* gQ = qkv + (long long)(seq_start + m * BR) * rs + h * DH;
    const bf16_t* gK = qkv + (long long)seq_start * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)seq_start * rs + (H + Hkv + hk) * DH;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const u32 sQa = smem_u32(sQ), sKa = smem_u32(sK), sVa = smem_u32(sV);

    load_tile<BR, DH, FWD_THREADS>(sQ, gQ, rs, L - m * BR, tid);
    load_tile<BC, DH, FWD_THREADS>(sK, gK, rs, L, tid);
    cp_commit();

    float o[DH / 8][4];
#pragma unroll
    for (int i = 0; i < DH / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-FLASH_INF, -FLASH_INF};
    float row_sum[2] = {0.f, 0.f};
    u32 qf[DH / 16][4];
    const float c = scale * LOG2E;
    const int n_tiles = m + 1;  // BR == BC: key tiles 0..m, the last one on the diagonal.

    for (int n = 0; n < n_tiles; ++n) {
        cp_wait<0>();
        __syncthreads();  // K_n landed; every warp finished P V_{n-1}, so sV may be refilled.
        if (n == 0) {
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) ldsm_x4(qf[kk], addr_a<DH>(sQa, warp * 16, kk, lane));
        }
        load_tile<BC, DH, FWD_THREADS>(sV, gV + (long long)n * BC * rs, rs, L - n * BC, tid);
        cp_commit();

        float s[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
#pragma unroll
            for (int np = 0; np < BC / 16; ++np) {
                u32 b[4];
                ldsm_x4(b, addr_b<DH>(sKa, np * 16, kk, lane));
                mma_bf16(s[2 * np], qf[kk], b[0], b[1]);
                mma_bf16(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
        if (n == m) {
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int i = m * BR + warp * 16 + g + ((e >> 1) << 3);
                    int j = n * BC + nt * 8 + 2 * t + (e & 1);
                    if (j > i || j >= L) s[nt][e] = -FLASH_INF;
                }
        }
        // Online softmax; rows g (r = 0) and g + 8 (r = 1) of this warp's 16.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -FLASH_INF;
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float m_new = fmaxf(row_max[r], mx);
            float ms = m_new == -FLASH_INF ? 0.f : m_new * c;  // never -inf - (-inf)
            float alpha = fast_exp2(row_max[r] * c - ms);
            row_max[r] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BC / 8; ++nt) {
                s[nt][2 * r] = fast_exp2(s[nt][2 * r] * c - ms);
                s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] * c - ms);
                sum += s[nt][2 * r] + s[nt][2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < DH / 8; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }

        cp_wait<0>();
        __syncthreads();  // V_n landed; every warp finished Q K_n^T, so sK may be refilled.
        if (n + 1 < n_tiles)
            load_tile<BC, DH, FWD_THREADS>(sK, gK + (long long)(n + 1) * BC * rs, rs,
                                           L - (n + 1) * BC, tid);
        cp_commit();

#pragma unroll
        for (int kj = 0; kj < BC / 16; ++kj) {
            u32 a[4];
            a[0] = pack_bf16(s[2 * kj][0], s[2 * kj][1]);
            a[1] = pack_bf16(s[2 * kj][2], s[2 * kj][3]);
            a[2] = pack_bf16(s[2 * kj + 1][0], s[2 * kj + 1][1]);
            a[3] = pack_bf16(s[2 * kj + 1][2], s[2 * kj + 1][3]);
#pragma unroll
            for (int dp = 0; dp < DH / 16; ++dp) {
                u32 b[4];
                ldsm_x4_t(b, addr_bt<DH>(sVa, kj * 16, dp, lane));
                mma_bf16(o[2 * dp], a, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        float inv = l > 0.f ? 1.f / l : 0.f;
        int i = m * BR + warp * 16 + g + 8 * r;
        if (i < L) {
            bf16_t* dst = out + (long long)(seq_start + i) * H * DH + h * DH + 2 * t;
#pragma unroll
            for (int dt = 0; dt < DH / 8; ++dt)
                *(u32*)(dst + dt * 8) = pack_bf16(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            if (t == 0)
                lse[(long long)h * N + seq_start + i] =
                    l > 0.f ? row_max[r] * scale + logf(l) : FLASH_INF;
        }
    }
}

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
    flash_fwd_64(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles, int H, int Hkv,
                 int N, float scale) {
    flash_fwd<64>(qkv, out, lse, tiles, H, Hkv, N, scale);
}
extern "C" __global__ void __launch_bounds__(FWD_THREADS)
    flash_fwd_128(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles, int H, int Hkv,
                  int N, float scale) {
    flash_fwd<128>(qkv, out, lse, tiles, H, Hkv, N, scale);
}
