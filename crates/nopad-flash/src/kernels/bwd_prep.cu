// bwd_prep.cu: backward preprocess, D = rowsum(d_out * out) and LSE in log2 units, padded.
//
// Computes, for every query tile row i of sequence (seq_start, L, m, pad) and query head h:
//   D[h, pad + i]    = sum_e d_out[t, h, e] * out[t, h, e]   (t = seq_start + i; 0 when i >= L)
//   lse2[h, pad + i] = lse[h, t] * log2 e                    (+inf when i >= L, so P = 0 there)
//   dqacc[h, pad + i, :] = 0 when dqacc is not null (the atomic backward's fp32 dQ accumulator)
// Shapes: out, d_out [N, H * DH] bf16; lse [H, N] fp32; D, lse2 [H, Tpad] fp32, where each
// sequence is padded to whole 64-row tiles so the main kernels read them without bounds checks;
// dqacc [H, Tpad, DH] fp32.
// Geometry: 1-D grid of tiles x heads, heads fastest (tile = blockIdx.x / H), 256 threads =
// 8 warps, each warp 8 rows, lanes split DH.
// Accumulation: fp32, warp-shuffle reduction.

template <int DH>
__device__ __forceinline__ void flash_bwd_prep(const bf16_t* __restrict__ out,
                                               const bf16_t* __restrict__ d_out,
                                               const float* __restrict__ lse, float* __restrict__ D,
                                               float* __restrict__ lse2,
                                               float* __restrict__ dqacc,
                                               const int4* __restrict__ tiles, int H, int N,
                                               int Tpad) {
    constexpr int PER = DH / 32;  // elements per lane: 2 or 4
    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (dqacc != nullptr) {
        float4* z = (float4*)(dqacc + ((long long)h * Tpad + tile.w + max(tile.z, 0) * 64) * DH);
        for (int x = threadIdx.x; x < 64 * DH / 4; x += 256) z[x] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int rr = 0; rr < 8; ++rr) {
        int i = max(tile.z, 0) * 64 + warp * 8 + rr;
        float s = 0.f;
        if (i < tile.y) {
            long long off = (long long)(tile.x + i) * H * DH + h * DH + lane * PER;
#pragma unroll
            for (int e = 0; e < PER; e += 2) {
                u32 a = *(const u32*)(out + off + e);
                u32 b = *(const u32*)(d_out + off + e);
                s += bf_lo(a) * bf_lo(b) + bf_hi(a) * bf_hi(b);
            }
        }
#pragma unroll
        for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
        if (lane == 0) {
            long long p = (long long)h * Tpad + tile.w + i;
            D[p] = s;
            lse2[p] = i < tile.y ? lse[(long long)h * N + tile.x + i] * LOG2E : FLASH_INF;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
    flash_bwd_prep_64(const bf16_t* out, const bf16_t* d_out, const float* lse, float* D,
                      float* lse2, float* dqacc, const int4* tiles, int H, int N, int Tpad) {
    flash_bwd_prep<64>(out, d_out, lse, D, lse2, dqacc, tiles, H, N, Tpad);
}
extern "C" __global__ void __launch_bounds__(256)
    flash_bwd_prep_128(const bf16_t* out, const bf16_t* d_out, const float* lse, float* D,
                       float* lse2, float* dqacc, const int4* tiles, int H, int N, int Tpad) {
    flash_bwd_prep<128>(out, d_out, lse, D, lse2, dqacc, tiles, H, N, Tpad);
}
