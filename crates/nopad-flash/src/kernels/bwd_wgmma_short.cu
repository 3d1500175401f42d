// bwd_wgmma_short.cu: varlen causal FlashAttention backward for every sequence length at head dim 64/128
// with Hopper warpgroup MMAs (sm_90a; elsewhere the kernels trap and the host never selects
// them; helpers in wgmma.cuh). The deterministic pair of bwd_dq.cu / bwd_dkdv.cu on 64 x 64
// tiles, one warpgroup (128 threads) per CTA, two CTAs per SM:
//
// flash_bwd_wgs_dq_128: per (query head h, 64-row query tile m; packed tiles as in bwd_dq.cu),
//   dQ_i = scale sum_j P_ij (dP_ij - D_i) K_j over key tiles n <= m (recompute, no atomics):
//   S = Q K^T, dP = dO V^T (m64n64k16 x 8 each, both operands K-major from shared memory);
//   dS stays in registers as the A operand of dQ += dS K (m64n{DH}k16 x 4, B = K MN-major).
//   With `out` given it first computes D = rowsum(dO o O) and lse2 of its rows and stores them
//   for the dK/dV kernel, which runs after it.
// flash_bwd_wgs_kv_128: per (kv head hk, 64-key tile n; packed tiles), dK and dV over the
//   group's (query head, query tile m >= n) steps: S^T = K Q^T, dP^T = V dO^T (m64n64k16 x 8,
//   K-major), P^T and dS^T stay in registers as the A operands of dV += P^T dO and
//   dK += dS^T Q (m64n{DH}k16 x 4, B = dO / Q MN-major): no shared-memory round trip and one
//   barrier per step. lse2 and D index columns here, so each step stages them in smem.
// Masking as bwd_dq.cu / bwd_dkdv.cu (causal inside a sequence; packed tiles: query row i sees
// keys from segs[64 p + i] on), but whole 64 x 64 tiles: no 16-key block skipping.
// Shared memory (SW128 tiles, 1024-byte aligned): dq: Q, dO + K, V [2][64][DH] = 96 / 48 KB;
// kv: K, V + Q, dO [2][64][DH] + lse2, D [2][64] + segs [64] = 97 / 49 KB (DH 128 / 64).
// CTAs per SM (registers, shared memory): 2 at DH 128; dq 4, kv 3 at DH 64.

#define WGS_THREADS 128

#ifdef FLASH_WGMMA
template <int DH>
__device__ __forceinline__ void flash_bwd_wgs_dq(const bf16_t* __restrict__ qkv,
                                                 const bf16_t* __restrict__ d_out,
                                                 float* __restrict__ lse2, float* __restrict__ Dg,
                                                 bf16_t* __restrict__ d_qkv,
                                                 const int4* __restrict__ tiles,
                                                 const int* __restrict__ segs,
                                                 const bf16_t* __restrict__ out,
                                                 const float* __restrict__ lse, int H, int Hkv,
                                                 int N, int Tpad, float scale) {
    static_assert(DH == 64 || DH == 128, "wgmma backward: head dim 64 or 128");
    constexpr u32 TB = 64 * DH * 2;  // bytes of a [64][DH] tile
    constexpr u32 BS = 64 * 128;     // its 64-column blocks' stride
    extern __shared__ __align__(128) unsigned char smem_wgs[];
    const u32 raw = smem_u32(smem_wgs);
    const u32 sQ = (raw + 1023) & ~1023u, sO = sQ + TB, sK = sO + TB, sV = sK + 2 * TB;
    float* sL = (float*)(smem_wgs + (sV + 2 * TB - raw));  // [64] lse2, then [64] D
    float* sD = sL + 64;

    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const int seq_start = tile.x, L = tile.y, m = tile.z < 0 ? 0 : tile.z, pad = tile.w;
    const int hk = h / (H / Hkv);
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, wl = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const float c = scale * LOG2E;

    const bf16_t* gK = qkv + (long long)seq_start * rs + (H + hk) * DH;
    const bf16_t* gV = qkv + (long long)seq_start * rs + (H + Hkv + hk) * DH;
    load_tile_sw<64, DH, WGS_THREADS>(sQ, qkv + (long long)(seq_start + m * 64) * rs + h * DH, rs,
                                  L - m * 64, tid);
    load_tile_sw<64, DH, WGS_THREADS>(sO, d_out + (long long)(seq_start + m * 64) * ors + h * DH,
                                  ors, L - m * 64, tid);
    load_tile_sw<64, DH, WGS_THREADS>(sK, gK, rs, L, tid);
    load_tile_sw<64, DH, WGS_THREADS>(sV, gV, rs, L, tid);
    cp_commit();

    // lse2 and D of this thread's accumulator rows 16 wl + g + 8 r.
    float l2[2], dd[2];
    int seg_lo[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r)
        if (tile.z < 0) seg_lo[r] = segs[(-tile.z - 1) * 64 + 16 * wl + g + 8 * r];
    if (out != nullptr) {
        // Row tid / 2: this thread sums half of its DH products of dO and O from global memory.
        const int row = tid >> 1, half = tid & 1, i = m * 64 + row;
        float dsum = 0.f;
        if (i < L) {
            const uint4* a = (const uint4*)(d_out + (long long)(seq_start + i) * ors + h * DH + half * (DH / 2));
            const uint4* b = (const uint4*)(out + (long long)(seq_start + i) * ors + h * DH + half * (DH / 2));
#pragma unroll
            for (int ch = 0; ch < DH / 16; ++ch) {
                uint4 x = a[ch], y = b[ch];
                dsum += bf_lo(x.x) * bf_lo(y.x) + bf_hi(x.x) * bf_hi(y.x);
                dsum += bf_lo(x.y) * bf_lo(y.y) + bf_hi(x.y) * bf_hi(y.y);
                dsum += bf_lo(x.z) * bf_lo(y.z) + bf_hi(x.z) * bf_hi(y.z);
                dsum += bf_lo(x.w) * bf_lo(y.w) + bf_hi(x.w) * bf_hi(y.w);
            }
        }
        dsum += __shfl_xor_sync(0xffffffffu, dsum, 1);
        const float l2v = i < L ? lse[(long long)h * N + seq_start + i] * LOG2E : FLASH_INF;
        if (half == 0) {
            long long p = (long long)h * Tpad + pad + i;
            Dg[p] = dsum;
            lse2[p] = l2v;
            sL[row] = l2v;
            sD[row] = dsum;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l2[r] = sL[16 * wl + g + 8 * r];
            dd[r] = sD[16 * wl + g + 8 * r];
        }
    } else {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            long long p = (long long)h * Tpad + pad + m * 64 + 16 * wl + g + 8 * r;
            l2[r] = lse2[p];
            dd[r] = Dg[p];
        }
    }

    float dq[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dq[i] = 0.f;

    for (int n = 0; n <= m; ++n) {
        const int stage = n & 1;
        cp_wait<0>();
        fence_async_smem();
        __syncthreads();  // K_n, V_n landed; every warp finished step n - 1 (its MMAs waited).
        if (n + 1 <= m) {
            load_tile_sw<64, DH, WGS_THREADS>(sK + (stage ^ 1) * TB, gK + (long long)(n + 1) * 64 * rs,
                                          rs, L - (n + 1) * 64, tid);
            load_tile_sw<64, DH, WGS_THREADS>(sV + (stage ^ 1) * TB, gV + (long long)(n + 1) * 64 * rs,
                                          rs, L - (n + 1) * 64, tid);
        }
        cp_commit();
        u32 qa = sQ, oa = sO, ka = sK + stage * TB, va = sV + stage * TB;
        asm volatile("mov.b32 %0, %0;" : "+r"(qa));
        asm volatile("mov.b32 %0, %0;" : "+r"(oa));
        asm volatile("mov.b32 %0, %0;" : "+r"(ka));
        asm volatile("mov.b32 %0, %0;" : "+r"(va));
        typedef unsigned long long u64;
        const u64 qK = wg_desc(qa, 16, 1024), oK = wg_desc(oa, 16, 1024);
        const u64 kK = wg_desc(ka, 16, 1024), vK = wg_desc(va, 16, 1024);
        const u64 kM = wg_desc(ka, BS, 1024);

        float s[32], dp[32];
        reg_fence<32>(s);
        reg_fence<32>(dp);
        wg_fence();
        wgmma_64x64_tiles<DH>(s, qK, kK);
        wg_commit();
        wgmma_64x64_tiles<DH>(dp, oK, vK);
        wg_commit();
        wg_wait<1>();
        reg_fence<32>(s);
        // P in place of S (0 where masked).
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int i = m * 64 + 16 * wl + g + 8 * r;
                const int key = n * 64 + 8 * j + 2 * t + (e & 1);
                float p = fast_exp2(s[4 * j + e] * c - l2[r]);
                if (n == m && (key > i || key >= L || key < seg_lo[r])) p = 0.f;
                s[4 * j + e] = p;
            }
        wg_wait<0>();
        reg_fence<32>(dp);
        // dS as bf16 A fragments (k = keys): slice kj holds n8 blocks 2 kj, 2 kj + 1.
        u32 da[4][4];
#pragma unroll
        for (int kj = 0; kj < 4; ++kj)
#pragma unroll
            for (int hb = 0; hb < 2; ++hb) {
                const int j = 2 * kj + hb;
                da[kj][2 * hb] = pack_bf16(s[4 * j] * (dp[4 * j] - dd[0]),
                                           s[4 * j + 1] * (dp[4 * j + 1] - dd[0]));
                da[kj][2 * hb + 1] = pack_bf16(s[4 * j + 2] * (dp[4 * j + 2] - dd[1]),
                                               s[4 * j + 3] * (dp[4 * j + 3] - dd[1]));
            }
        reg_fence<DH / 2>(dq);
        wg_fence();
#pragma unroll
        for (int kj = 0; kj < 4; ++kj) wgmma_rs<DH, 1>(dq, da[kj], kM + ((kj * 2048) >> 4), 1);
        wg_commit();
        wg_wait<0>();
        reg_fence<DH / 2>(dq);
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m * 64 + 16 * wl + g + 8 * r;
        if (i < L) {
            bf16_t* dst = d_qkv + (long long)(seq_start + i) * rs + h * DH + 2 * t;
#pragma unroll
            for (int jj = 0; jj < DH / 8; ++jj)
                *(u32*)(dst + 8 * jj) = pack_bf16(dq[4 * jj + 2 * r] * scale, dq[4 * jj + 2 * r + 1] * scale);
        }
    }
}

template <int DH>
__device__ __forceinline__ void flash_bwd_wgs_kv(const bf16_t* __restrict__ qkv,
                                                 const bf16_t* __restrict__ d_out,
                                                 const float* __restrict__ lse2,
                                                 const float* __restrict__ Dg,
                                                 bf16_t* __restrict__ d_qkv,
                                                 const int4* __restrict__ tiles,
                                                 const int* __restrict__ segs, int H, int Hkv,
                                                 int Tpad, float scale) {
    static_assert(DH == 64 || DH == 128, "wgmma backward: head dim 64 or 128");
    constexpr u32 TB = 64 * DH * 2;  // bytes of a [64][DH] tile
    constexpr u32 BS = 64 * 128;     // its 64-column blocks' stride
    extern __shared__ __align__(128) unsigned char smem_wgs[];
    const u32 raw = smem_u32(smem_wgs);
    const u32 sK = (raw + 1023) & ~1023u, sV = sK + TB, sQ = sV + TB, sO = sQ + 2 * TB;
    float* sL = (float*)(smem_wgs + (sO + 2 * TB - raw));  // [2][64]
    float* sD = sL + 128;                                  // [2][64]
    int* sSeg = (int*)(sD + 128);                          // [64]

    const int hk = blockIdx.x % Hkv;
    const int4 tile = tiles[blockIdx.x / Hkv];
    const int seq_start = tile.x, L = tile.y, pad = tile.w;
    const bool packed = tile.z < 0;
    const int n = packed ? 0 : tile.z;
    const int G = H / Hkv;
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, wl = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nq = (L + 63) / 64;
    const int steps_per_head = nq - n;
    const int steps = G * steps_per_head;
    const float c = scale * LOG2E;

    if (tid < 64) sSeg[tid] = packed ? segs[(-tile.z - 1) * 64 + tid] : 0;
    load_tile_sw<64, DH, WGS_THREADS>(sK, qkv + (long long)(seq_start + n * 64) * rs + (H + hk) * DH,
                                  rs, L - n * 64, tid);
    load_tile_sw<64, DH, WGS_THREADS>(sV,
                                  qkv + (long long)(seq_start + n * 64) * rs + (H + Hkv + hk) * DH,
                                  rs, L - n * 64, tid);
    auto load_step = [&](int s, int stage) {
        int h = hk * G + s / steps_per_head;
        int m = n + s % steps_per_head;
        load_tile_sw<64, DH, WGS_THREADS>(sQ + stage * TB, qkv + (long long)(seq_start + m * 64) * rs + h * DH,
                                      rs, L - m * 64, tid);
        load_tile_sw<64, DH, WGS_THREADS>(sO + stage * TB, d_out + (long long)(seq_start + m * 64) * ors + h * DH,
                                      ors, L - m * 64, tid);
        if (tid < 32) {
            long long p = (long long)h * Tpad + pad + m * 64 + (tid & 15) * 4;
            const float* src = tid < 16 ? lse2 + p : Dg + p;
            float* dst = (tid < 16 ? sL : sD) + stage * 64 + (tid & 15) * 4;
            cp_async16(smem_u32(dst), src, true);
        }
    };
    load_step(0, 0);
    cp_commit();

    float dk[DH / 2], dv[DH / 2];
#pragma unroll
    for (int i = 0; i < DH / 2; ++i) dk[i] = dv[i] = 0.f;
    // This thread's accumulator rows are keys n 64 + 16 wl + g + 8 r; its columns queries
    // 8 j + 2t + (0, 1) of the step's tile.
    const int key0 = n * 64 + 16 * wl + g;

    for (int s = 0; s < steps; ++s) {
        const int stage = s & 1;
        cp_wait<0>();
        fence_async_smem();
        __syncthreads();  // stage s landed; every warp finished step s - 1 (its MMAs waited).
        if (s + 1 < steps) load_step(s + 1, stage ^ 1);
        cp_commit();
        const int m = n + s % steps_per_head;
        u32 qa = sQ + stage * TB, oa = sO + stage * TB, ka = sK, va = sV;
        asm volatile("mov.b32 %0, %0;" : "+r"(qa));
        asm volatile("mov.b32 %0, %0;" : "+r"(oa));
        asm volatile("mov.b32 %0, %0;" : "+r"(ka));
        asm volatile("mov.b32 %0, %0;" : "+r"(va));
        typedef unsigned long long u64;
        const u64 qK = wg_desc(qa, 16, 1024), oK = wg_desc(oa, 16, 1024);
        const u64 kK = wg_desc(ka, 16, 1024), vK = wg_desc(va, 16, 1024);
        const u64 qM = wg_desc(qa, BS, 1024), oM = wg_desc(oa, BS, 1024);

        float st[32], dpt[32];
        reg_fence<32>(st);
        reg_fence<32>(dpt);
        wg_fence();
        wgmma_64x64_tiles<DH>(st, kK, qK);
        wg_commit();
        wgmma_64x64_tiles<DH>(dpt, vK, oK);
        wg_commit();
        const float* sLs = sL + stage * 64;
        const float* sDs = sD + stage * 64;
        const bool diag = m == n;
        wg_wait<1>();
        reg_fence<32>(st);
        // P^T in place of S^T (0 where masked: key > query, or before the query's segment).
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int q = 8 * j + 2 * t;  // local query column of elements e = 0 (and 1)
            const float2 l2 = *(const float2*)(sLs + q);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qe = q + (e & 1);
                const int key = key0 + 8 * (e >> 1);
                float p = fast_exp2(st[4 * j + e] * c - ((e & 1) ? l2.y : l2.x));
                if (diag && (key > m * 64 + qe || key < sSeg[qe])) p = 0.f;
                st[4 * j + e] = p;
            }
        }
        wg_wait<0>();
        reg_fence<32>(dpt);
        // P^T and dS^T = P^T (dP^T - D[query]) as bf16 A fragments (k = queries).
        u32 pa[4][4], da[4][4];
#pragma unroll
        for (int kq = 0; kq < 4; ++kq)
#pragma unroll
            for (int hb = 0; hb < 2; ++hb) {
                const int j = 2 * kq + hb;
                const float2 d = *(const float2*)(sDs + 8 * j + 2 * t);
                pa[kq][2 * hb] = pack_bf16(st[4 * j], st[4 * j + 1]);
                pa[kq][2 * hb + 1] = pack_bf16(st[4 * j + 2], st[4 * j + 3]);
                da[kq][2 * hb] = pack_bf16(st[4 * j] * (dpt[4 * j] - d.x), st[4 * j + 1] * (dpt[4 * j + 1] - d.y));
                da[kq][2 * hb + 1] = pack_bf16(st[4 * j + 2] * (dpt[4 * j + 2] - d.x),
                                               st[4 * j + 3] * (dpt[4 * j + 3] - d.y));
            }
        reg_fence<DH / 2>(dk);
        reg_fence<DH / 2>(dv);
        wg_fence();
#pragma unroll
        for (int kq = 0; kq < 4; ++kq) wgmma_rs<DH, 1>(dv, pa[kq], oM + ((kq * 2048) >> 4), 1);
#pragma unroll
        for (int kq = 0; kq < 4; ++kq) wgmma_rs<DH, 1>(dk, da[kq], qM + ((kq * 2048) >> 4), 1);
        wg_commit();
        wg_wait<0>();
        reg_fence<DH / 2>(dk);
        reg_fence<DH / 2>(dv);
    }
    cp_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = key0 + 8 * r;
        if (j < L) {
            bf16_t* dK = d_qkv + (long long)(seq_start + j) * rs + (H + hk) * DH + 2 * t;
            bf16_t* dV = d_qkv + (long long)(seq_start + j) * rs + (H + Hkv + hk) * DH + 2 * t;
#pragma unroll
            for (int jj = 0; jj < DH / 8; ++jj) {
                *(u32*)(dK + 8 * jj) = pack_bf16(dk[4 * jj + 2 * r] * scale, dk[4 * jj + 2 * r + 1] * scale);
                *(u32*)(dV + 8 * jj) = pack_bf16(dv[4 * jj + 2 * r], dv[4 * jj + 2 * r + 1]);
            }
        }
    }
}

#define WGS_ENTRY(DH, MINB_DQ, MINB_KV)                                                         \
    extern "C" __global__ void __launch_bounds__(WGS_THREADS, MINB_DQ)                           \
        flash_bwd_wgs_dq_##DH(const bf16_t* qkv, const bf16_t* d_out, float* lse2, float* D,    \
                              bf16_t* d_qkv, const int4* tiles, const int* segs,               \
                              const bf16_t* out, const float* lse, int H, int Hkv, int N,       \
                              int Tpad, float scale) {                                          \
        flash_bwd_wgs_dq<DH>(qkv, d_out, lse2, D, d_qkv, tiles, segs, out, lse, H, Hkv, N,      \
                             Tpad, scale);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(WGS_THREADS, MINB_KV)                           \
        flash_bwd_wgs_kv_##DH(const bf16_t* qkv, const bf16_t* d_out, const float* lse2,        \
                              const float* D, bf16_t* d_qkv, const int4* tiles,                 \
                              const int* segs, float* dqacc, int H, int Hkv, int Tpad,          \
                              float scale) {                                                    \
        flash_bwd_wgs_kv<DH>(qkv, d_out, lse2, D, d_qkv, tiles, segs, H, Hkv, Tpad, scale);     \
    }
WGS_ENTRY(64, 4, 3)
WGS_ENTRY(128, 2, 2)

#else  // not sm_90a: same entry points, never launched (the host checks the architecture).

#define WGS_ENTRY(DH)                                                                          \
    extern "C" __global__ void flash_bwd_wgs_dq_##DH(const bf16_t*, const bf16_t*, float*,       \
                                                     float*, bf16_t*, const int4*, const int*,  \
                                                     const bf16_t*, const float*, int, int,     \
                                                     int, int, float) {                         \
        __trap();                                                                               \
    }                                                                                           \
    extern "C" __global__ void flash_bwd_wgs_kv_##DH(const bf16_t*, const bf16_t*, const float*, \
                                                     const float*, bf16_t*, const int4*,        \
                                                     const int*, float*, int, int, int, float) { \
        __trap();                                                                               \
    }
WGS_ENTRY(64)
WGS_ENTRY(128)

#endif
