// fwd_wgmma.cu: varlen causal FlashAttention forward at head dim 64 or 128 with Hopper warpgroup MMAs
// (sm_90a; elsewhere the kernel traps and the host never selects it; helpers in wgmma.cuh).
//
// Same work, tile list and outputs as fwd.cu's 64-row kernel: per (query head h, 64-row query
// tile m; packed tiles of short sequences with the block-diagonal mask of segs),
//   out = softmax_causal(scale q k^T) v, lse = ln sum_j exp(scale q . k_j),
// over key tiles n <= m: S = Q K_n^T (m64n64k16 x 8, both operands K-major from shared memory),
// online softmax in registers (exp2 folding), P as bf16 A fragments in registers for
// O += P V_n (m64n{DH}k16 x 4, B = V MN-major). One warpgroup (128 threads) per CTA; Q, K, V one
// SW128 tile each, in FA2's order: V_n loads during S = Q K_n^T and the softmax, K_{n+1} during
// P V_n. Shared memory 3 [64][DH] tiles + 1 KB alignment (49 KB at DH 128: three CTAs per SM,
// registers allow 170; 25 KB at DH 64: four, 128 registers).

#define FWG_THREADS 128

#ifdef FLASH_WGMMA
template <int DH>
__device__ __forceinline__ void flash_fwd_wg(const bf16_t* __restrict__ qkv,
                                             bf16_t* __restrict__ out, float* __restrict__ lse,
                                             const int4* __restrict__ tiles,
                                             const int* __restrict__ segs, int H, int Hkv, int N,
                                             float scale) {
    static_assert(DH == 64 || DH == 128, "wgmma forward: head dim 64 or 128");
    constexpr u32 TB = 64 * DH * 2;  // bytes of a [64][DH] tile
    constexpr u32 BS = 64 * 128;     // its 64-column blocks' stride
    extern __shared__ __align__(128) unsigned char smem_fwg[];
    const u32 raw = smem_u32(smem_fwg);
    const u32 sQ = (raw + 1023) & ~1023u, sK = sQ + TB, sV = sK + TB;

    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int seq_start = tile.x, L = tile.y, m = tile.z < 0 ? 0 : tile.z;
    const int hk = h / (H / Hkv);
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const int tid = threadIdx.x, wl = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const float c = scale * LOG2E;

    const bf16_t* gK = qkv + (long long)seq_start * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)seq_start * rs + (H + Hkv + hk) * DH;
    load_tile_sw<64, DH, FWG_THREADS>(sQ, qkv + (long long)(seq_start + m * 64) * rs + h * DH, rs,
                                  L - m * 64, tid);
    load_tile_sw<64, DH, FWG_THREADS>(sK, gK, rs, L, tid);
    cp_commit();
    load_tile_sw<64, DH, FWG_THREADS>(sV, gV, rs, L, tid);
    cp_commit();

    // This thread's rows 16 wl + g + 8 r of the tile.
    int seg_lo[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (tile.z < 0) seg_lo[r] = segs[(-tile.z - 1) * 64 + 16 * wl + g + 8 * r];
    float row_max[2] = {-FLASH_INF, -FLASH_INF}, row_sum[2] = {0.f, 0.f};
    float o[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) o[i] = 0.f;

    for (int n = 0; n <= m; ++n) {
        cp_wait<1>();
        fence_async_smem();
        __syncthreads();  // K_n landed (V_n may still be in flight).
        u32 qa = sQ, ka = sK, va = sV;
        asm volatile("mov.b32 %0, %0;" : "+r"(qa));
        asm volatile("mov.b32 %0, %0;" : "+r"(ka));
        asm volatile("mov.b32 %0, %0;" : "+r"(va));
        typedef unsigned long long u64;
        const u64 qK = wg_desc(qa, 16, 1024), kK = wg_desc(ka, 16, 1024);
        const u64 vM = wg_desc(va, BS, 1024);

        float s[32];
        reg_fence<32>(s);
        wg_fence();
        wgmma_64x64_tiles<DH>(s, qK, kK);
        wg_commit();
        wg_wait<0>();
        reg_fence<32>(s);
        if (n == m) {  // diagonal (and packed) tile: causal, sequence end, segment start
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1;
                    const int i = m * 64 + 16 * wl + g + 8 * r;
                    const int key = n * 64 + 8 * j + 2 * t + (e & 1);
                    if (key > i || key >= L || key < seg_lo[r]) s[4 * j + e] = -FLASH_INF;
                }
        }
        // Online softmax on rows g (r = 0) and g + 8 (r = 1); the row's 4 lanes t share it.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -FLASH_INF;
#pragma unroll
            for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(row_max[r], mx);
            const float ms = m_new == -FLASH_INF ? 0.f : m_new * c;  // never -inf - (-inf)
            const float alpha = fast_exp2(row_max[r] * c - ms);
            row_max[r] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                s[4 * j + 2 * r] = fast_exp2(s[4 * j + 2 * r] * c - ms);
                s[4 * j + 2 * r + 1] = fast_exp2(s[4 * j + 2 * r + 1] * c - ms);
                sum += s[4 * j + 2 * r] + s[4 * j + 2 * r + 1];
            }
            row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
            for (int jj = 0; jj < DH / 8; ++jj) {
                o[4 * jj + 2 * r] *= alpha;
                o[4 * jj + 2 * r + 1] *= alpha;
            }
        }
        u32 pa[4][4];  // P as bf16 A fragments, k = keys
#pragma unroll
        for (int kj = 0; kj < 4; ++kj) {
            pa[kj][0] = pack_bf16(s[8 * kj], s[8 * kj + 1]);
            pa[kj][1] = pack_bf16(s[8 * kj + 2], s[8 * kj + 3]);
            pa[kj][2] = pack_bf16(s[8 * kj + 4], s[8 * kj + 5]);
            pa[kj][3] = pack_bf16(s[8 * kj + 6], s[8 * kj + 7]);
        }
        cp_wait<0>();
        fence_async_smem();
        __syncthreads();  // V_n landed; every warp's S MMAs are done, so sK may be refilled.
        if (n + 1 <= m)
            load_tile_sw<64, DH, FWG_THREADS>(sK, gK + (long long)(n + 1) * 64 * rs, rs,
                                          L - (n + 1) * 64, tid);
        cp_commit();
        reg_fence<DH / 2>(o);
        wg_fence();
#pragma unroll
        for (int kj = 0; kj < 4; ++kj) wgmma_rs<DH, 1>(o, pa[kj], vM + ((kj * 2048) >> 4), 1);
        wg_commit();
        wg_wait<0>();
        reg_fence<DH / 2>(o);
        __syncthreads();  // every warp's P V MMAs are done, so sV may be refilled.
        if (n + 1 <= m)
            load_tile_sw<64, DH, FWG_THREADS>(sV, gV + (long long)(n + 1) * 64 * rs, rs,
                                          L - (n + 1) * 64, tid);
        cp_commit();
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = row_sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int i = m * 64 + 16 * wl + g + 8 * r;
        if (i < L) {
            bf16_t* dst = out + (long long)(seq_start + i) * H * DH + h * DH + 2 * t;
#pragma unroll
            for (int jj = 0; jj < DH / 8; ++jj)
                *(u32*)(dst + 8 * jj) = pack_bf16(o[4 * jj + 2 * r] * inv, o[4 * jj + 2 * r + 1] * inv);
            if (t == 0)
                lse[(long long)h * N + seq_start + i] = l > 0.f ? row_max[r] * scale + logf(l) : FLASH_INF;
        }
    }
}

#define FWG_ENTRY(DH, MINB)                                                                    \
    extern "C" __global__ void __launch_bounds__(FWG_THREADS, MINB)                             \
        flash_fwd_wg_##DH(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles,       \
                          const int* segs, int H, int Hkv, int N, float scale) {               \
        flash_fwd_wg<DH>(qkv, out, lse, tiles, segs, H, Hkv, N, scale);                        \
    }
FWG_ENTRY(64, 4)
FWG_ENTRY(128, 3)

#else  // not sm_90a: same entry point, never launched (the host checks the architecture).

#define FWG_ENTRY(DH)                                                                          \
    extern "C" __global__ void flash_fwd_wg_##DH(const bf16_t*, bf16_t*, float*, const int4*,  \
                                                 const int*, int, int, int, float) {            \
        __trap();                                                                               \
    }
FWG_ENTRY(64)
FWG_ENTRY(128)

#endif
