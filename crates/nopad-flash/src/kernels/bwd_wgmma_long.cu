// bwd_wgmma_long.cu: varlen causal FlashAttention backward for long sequences at head dim 128 with
// Hopper warpgroup MMAs (`wgmma.mma_async`, sm_90a only; elsewhere the kernels trap and the host
// never selects them).
//
// FA2's backward layout (one CTA per 128-key tile x kv head of a sequence of at
// least plan::AUTO_WIDE_MIN tokens; (query head, 64-row query tile m >= 2n) steps; ATOMIC adds
// each step's dQ partial to dqacc with 16-byte reds), but the five matmuls of a step are 64 x N
// warpgroup MMAs reading both operands from shared memory:
//   S = Q K^T, dP = dO V^T [64 q x 128 keys]: warpgroup w (of 2) owns keys 64w..64w+63
//     (m64n64k16 x 8, A = Q / dO K-major, B = K / V K-major);
//   P = exp2(c S - lse2), dS = P (dP - D) to shared memory as bf16 [q][key];
//   dV += P^T dO, dK += dS^T Q [128 keys x 128]: warpgroup w owns keys 64w.. (m64n128k16 x 4,
//     A = P^T / dS^T MN-major, B = dO / Q MN-major), so each warpgroup reads only its own P, dS;
//   dQ = dS K [64 q x 128] (ATOMIC): warpgroup w owns columns 64w.. (m64n64k16 x 8, A = dS
//     K-major, B = K MN-major); its reds run while dV / dK are still in the tensor cores.
// Only ATOMIC = false has an entry point (the deterministic backward: dQ comes from
// bwd_wgmma_short.cu); ATOMIC = true served the atomic-dQ backward (docs/FLASH.md section 9).
// Accumulators: dK, dV 64 + 64 fp32 per thread for the whole CTA; S, dP (then dQ) 32 + 32.
//
// Shared tiles: wgmma.cuh's SW128 layout and descriptors.
// Shared memory: K, V [128][128] + Q, dO [2][64][128] + P, dS [64][128] bf16 + lse2, D [2][64]
// fp32 + 1 KB alignment slack = 164 KB: one CTA (2 warpgroups) per SM.

#define WG_THREADS 256
#define WG_HEADS_FAST_G1 0

#ifdef FLASH_WGMMA

template <bool ATOMIC>
__device__ __forceinline__ void flash_bwd_wg(const bf16_t* __restrict__ qkv,
                                             const bf16_t* __restrict__ d_out,
                                             const float* __restrict__ lse2,
                                             const float* __restrict__ Dg,
                                             bf16_t* __restrict__ d_qkv,
                                             const int4* __restrict__ tiles,
                                             float* __restrict__ dqacc, int H, int Hkv, int Tpad,
                                             float scale) {
    constexpr int DH = 128, KT = 128, QT = 64;
    constexpr u32 QB = QT * DH * 2;  // bytes of a [64][128] tile (column blocks 8 KB apart)
    constexpr u32 KB = KT * DH * 2;  // bytes of a [128][128] tile (column blocks 16 KB apart)
    extern __shared__ __align__(128) unsigned char smem_wg[];
    const u32 raw = smem_u32(smem_wg);
    const u32 sK = (raw + 1023) & ~1023u;
    const u32 sV = sK + KB, sQ = sV + KB, sO = sQ + 2 * QB, sP = sO + 2 * QB, sS = sP + QB;
    float* sL = (float*)(smem_wg + (sS + QB - raw));  // [2][64]
    float* sD = sL + 2 * QT;                           // [2][64]

    // Grid order: kv heads fastest, or, without GQA (G = 1) unless
    // WG_HEADS_FAST_G1, all key tiles of one head first (FA2's order: the CTAs in flight share
    // Q, dO and dqacc in L2). Run 7b: FA2's order gave a (G = 1) +10% and b, e (G = 4) -16%, -18%.
    const bool heads_fast = WG_HEADS_FAST_G1 || H != Hkv;
    const int ntiles = gridDim.x / Hkv;
    const int hk = heads_fast ? blockIdx.x % Hkv : blockIdx.x / ntiles;
    const int4 tile = tiles[heads_fast ? blockIdx.x / Hkv : blockIdx.x % ntiles];
    const int seq_start = tile.x, L = tile.y, n = tile.z, pad = tile.w;
    const int G = H / Hkv;
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    const long long ors = (long long)H * DH;
    const int tid = threadIdx.x, wg = tid >> 7, wl = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int nq = (L + QT - 1) / QT;
    const int m0 = 2 * n;
    const int steps_per_head = nq - m0;
    const int steps = G * steps_per_head;
    const float c = scale * LOG2E;

    load_tile_sw<KT, 128, WG_THREADS>(sK, qkv + (long long)(seq_start + n * KT) * rs + (H + hk) * DH,
                                 rs, L - n * KT, tid);
    load_tile_sw<KT, 128, WG_THREADS>(sV,
                                 qkv + (long long)(seq_start + n * KT) * rs + (H + Hkv + hk) * DH,
                                 rs, L - n * KT, tid);
    auto load_step = [&](int s, int stage) {
        int h = hk * G + s / steps_per_head;
        int m = m0 + s % steps_per_head;
        const bf16_t* gQ = qkv + (long long)(seq_start + m * QT) * rs + h * DH;
        const bf16_t* gO = d_out + (long long)(seq_start + m * QT) * ors + h * DH;
        load_tile_sw<QT, 128, WG_THREADS>(sQ + stage * QB, gQ, rs, L - m * QT, tid);
        load_tile_sw<QT, 128, WG_THREADS>(sO + stage * QB, gO, ors, L - m * QT, tid);
        if (tid < 32) {
            long long p = (long long)h * Tpad + pad + m * QT + (tid & 15) * 4;
            const float* src = tid < 16 ? lse2 + p : Dg + p;
            float* dst = (tid < 16 ? sL : sD) + stage * QT + (tid & 15) * 4;
            cp_async16(smem_u32(dst), src, true);
        }
    };
    load_step(0, 0);
    cp_commit();

    float dk[64], dv[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) dk[i] = dv[i] = 0.f;

    // This thread's rows of a 64-row accumulator: 16 wl + g + 8 r. Its P / dS words: row q,
    // keys 64 wg + 8 j + 2t (+1): byte wg 8 KB + q 128 + ((j ^ g) << 4) + 4t (q & 7 == g).
    const u32 pw = wg * (QB / 2) + (16 * wl + g) * 128 + 4 * t;

    for (int s = 0; s < steps; ++s) {
        const int stage = s & 1;
        cp_wait<0>();
        fence_async_smem();
        __syncthreads();  // stage s landed; every warpgroup finished step s - 1 (waited).
        if (s + 1 < steps) load_step(s + 1, stage ^ 1);
        cp_commit();
        const int h = hk * G + s / steps_per_head;
        const int m = m0 + s % steps_per_head;
        // Descriptor bases for this step, through opaque moves so the compiler derives each
        // MMA's descriptor with one add instead of keeping ~50 of them live across the loop.
        u32 qa = sQ + stage * QB, oa = sO + stage * QB, ka = sK, va = sV, pa = sP, da = sS;
        asm volatile("mov.b32 %0, %0;" : "+r"(qa));
        asm volatile("mov.b32 %0, %0;" : "+r"(oa));
        asm volatile("mov.b32 %0, %0;" : "+r"(ka));
        asm volatile("mov.b32 %0, %0;" : "+r"(va));
        asm volatile("mov.b32 %0, %0;" : "+r"(pa));
        asm volatile("mov.b32 %0, %0;" : "+r"(da));
        typedef unsigned long long u64;
        const u64 qK = wg_desc(qa, 16, 1024), oK = wg_desc(oa, 16, 1024);  // K-major
        const u64 kK = wg_desc(ka, 16, 1024), vK = wg_desc(va, 16, 1024);
        const u64 dK_ = wg_desc(da, 16, 1024);
        const u64 qM = wg_desc(qa, QB / 2, 1024), oM = wg_desc(oa, QB / 2, 1024);  // MN-major
        const u64 kM = wg_desc(ka, KB / 2, 1024);
        const u64 pM = wg_desc(pa, QB / 2, 1024), dM = wg_desc(da, QB / 2, 1024);
        const float* sLs = sL + stage * QT;
        const float* sDs = sD + stage * QT;
        // Only m = 2n, 2n + 1 cross the diagonal; at m = 2n keys 64..127 of the tile are after
        // every query, so warpgroup 1's S block is all masked (skip: its P and dS are zeros).
        const bool diag = m <= 2 * n + 1;
        const bool skip = m == 2 * n && wg == 1;

        float sc[32], dp[32];
        {  // Issued even when skip (no divergent path around wgmma: ptxas would serialize).
            reg_fence<32>(sc);
            reg_fence<32>(dp);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                const u32 ko = (kk >> 2) * (QB / 2) + (kk & 3) * 32;
                const u32 kb = (kk >> 2) * (KB / 2) + wg * (KB / 4) + (kk & 3) * 32;
                wgmma_64x64<0, 0>(sc, qK + (ko >> 4), kK + (kb >> 4), kk);
            }
            wg_commit();
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                const u32 ko = (kk >> 2) * (QB / 2) + (kk & 3) * 32;
                const u32 kb = (kk >> 2) * (KB / 2) + wg * (KB / 4) + (kk & 3) * 32;
                wgmma_64x64<0, 0>(dp, oK + (ko >> 4), vK + (kb >> 4), kk);
            }
            wg_commit();
            wg_wait<1>();
            reg_fence<32>(sc);
        }
        // P = exp2(c S - lse2) (0 where key > query; lse2 = +inf on rows >= L gives 0).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = 16 * wl + g + 8 * r;
            const float l2 = sLs[q];
            const int jlim = diag ? m * QT + q - (n * KT + 64 * wg + 2 * t) : (1 << 30);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float p0 = fast_exp2(sc[4 * j + 2 * r] * c - l2);
                float p1 = fast_exp2(sc[4 * j + 2 * r + 1] * c - l2);
                p0 = (skip || 8 * j > jlim) ? 0.f : p0;
                p1 = (skip || 8 * j + 1 > jlim) ? 0.f : p1;
                st_shared_b32(sP + pw + r * 1024 + ((j ^ g) << 4), pack_bf16(p0, p1));
            }
        }
        wg_wait<0>();
        reg_fence<32>(dp);
        // dS = P (dP - D) (P read back from this thread's own words).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int q = 16 * wl + g + 8 * r;
            const float d = sDs[q];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 off = pw + r * 1024 + ((j ^ g) << 4);
                const u32 p = ld_shared_b32(sP + off);
                const float x0 = skip ? 0.f : dp[4 * j + 2 * r] - d;
                const float x1 = skip ? 0.f : dp[4 * j + 2 * r + 1] - d;
                st_shared_b32(sS + off, pack_bf16(bf_lo(p) * x0, bf_hi(p) * x1));
            }
        }
        fence_async_smem();
        __syncthreads();  // P and dS complete and visible to the tensor cores.

        // dQ (ATOMIC) first, so its reds overlap dV / dK; then dV += P^T dO, dK += dS^T Q.
        float* acc = sc;  // S is dead: its registers take dQ [64 q][64 columns of wg].
        reg_fence<64>(dk);
        reg_fence<64>(dv);
        if (ATOMIC) reg_fence<32>(acc);
        wg_fence();
        if (ATOMIC) {
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const u32 ao = (kk >> 2) * (QB / 2) + (kk & 3) * 32;
                const u32 bo = wg * (KB / 2) + kk * 2048;
                wgmma_64x64<0, 1>(acc, dK_ + (ao >> 4), kM + (bo >> 4), kk);
            }
            wg_commit();
        }
        {  // (when skip, P and dS are 0: adds nothing)
#pragma unroll
            for (int kq = 0; kq < QT / 16; ++kq) {
                const u32 ao = wg * (QB / 2) + kq * 2048;
                wgmma_64x128<1, 1>(dv, pM + (ao >> 4), oM + (kq * 2048 >> 4), 1);
            }
#pragma unroll
            for (int kq = 0; kq < QT / 16; ++kq) {
                const u32 ao = wg * (QB / 2) + kq * 2048;
                wgmma_64x128<1, 1>(dk, dM + (ao >> 4), qM + (kq * 2048 >> 4), 1);
            }
        }
        wg_commit();
        if (ATOMIC) {
            wg_wait<1>();
            reg_fence<32>(acc);
            // Lanes t, t ^ 1 pair up: the even one adds row g, columns 2t .. 2t + 3, the odd
            // one row g + 8, columns 2t - 2 .. 2t + 1 (one 16-byte red each).
            const bool odd = t & 1;
            const int q0 = m * QT + 16 * wl;  // first row of this warp's 16
            float* dst = dqacc + ((long long)h * Tpad + pad + q0 + g + (odd ? 8 : 0)) * DH +
                         64 * wg + 2 * t - (odd ? 2 : 0);
            const bool live = q0 < L;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float x0 = odd ? acc[4 * j] : acc[4 * j + 2];
                float x1 = odd ? acc[4 * j + 1] : acc[4 * j + 3];
                float y0 = __shfl_xor_sync(0xffffffffu, x0, 1);
                float y1 = __shfl_xor_sync(0xffffffffu, x1, 1);
                float v0 = odd ? y0 : acc[4 * j], v1 = odd ? y1 : acc[4 * j + 1];
                float v2 = odd ? acc[4 * j + 2] : y0, v3 = odd ? acc[4 * j + 3] : y1;
                if (live) red_add_v4(dst + 8 * j, v0, v1, v2, v3);
            }
        }
        wg_wait<0>();
        reg_fence<64>(dk);
        reg_fence<64>(dv);
    }
    cp_wait<0>();

    // dK, dV rows: keys 64 wg + 16 wl + g + 8 r of the tile, columns 8 j + 2t (+1).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = n * KT + 64 * wg + 16 * wl + g + 8 * r;
        if (j < L) {
            bf16_t* dK = d_qkv + (long long)(seq_start + j) * rs + (H + hk) * DH + 2 * t;
            bf16_t* dV = d_qkv + (long long)(seq_start + j) * rs + (H + Hkv + hk) * DH + 2 * t;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj) {
                *(u32*)(dK + 8 * jj) = pack_bf16(dk[4 * jj + 2 * r] * scale, dk[4 * jj + 2 * r + 1] * scale);
                *(u32*)(dV + 8 * jj) = pack_bf16(dv[4 * jj + 2 * r], dv[4 * jj + 2 * r + 1]);
            }
        }
    }
}

// Self-test of the descriptors and operand layouts used above (one warpgroup), against a CPU
// product: x [64][128], y [128][128] bf16 row-major; out fp32:
//   c1 [64][64]  = x y[0:64]^T          (S: both K-major)
//   c2 [64][128] = x[:, 0:64]^T y[0:64]  (dV: A = P^T MN-major, B = dO MN-major, 2 n blocks)
//   c3 [64][64]  = x y[:, 64:128]        (dQ of warpgroup 1: A K-major, B = K MN-major)
extern "C" __global__ void __launch_bounds__(128, 1)
    flash_wg_selftest(const bf16_t* x, const bf16_t* y, float* c1, float* c2, float* c3) {
    extern __shared__ __align__(128) unsigned char smem_wgt[];
    const u32 raw = smem_u32(smem_wgt);
    const u32 sx = (raw + 1023) & ~1023u, sy = sx + 64 * 128 * 2;
    const int tid = threadIdx.x, wl = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    load_tile_sw<64, 128, 128>(sx, x, 128, 64, tid);
    load_tile_sw<128, 128, 128>(sy, y, 128, 128, tid);
    cp_commit();
    cp_wait<0>();
    fence_async_smem();
    __syncthreads();
    float a[32], b[64], d[32];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        wgmma_64x64<0, 0>(a, wg_desc(sx + (kk >> 2) * 8192 + (kk & 3) * 32, 16, 1024),
                          wg_desc(sy + (kk >> 2) * 16384 + (kk & 3) * 32, 16, 1024), kk);
    wg_commit();
#pragma unroll
    for (int kq = 0; kq < 4; ++kq)
        wgmma_64x128<1, 1>(b, wg_desc(sx + kq * 2048, 8192, 1024),
                           wg_desc(sy + kq * 2048, 16384, 1024), kq);
    wg_commit();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        wgmma_64x64<0, 1>(d, wg_desc(sx + (kk >> 2) * 8192 + (kk & 3) * 32, 16, 1024),
                          wg_desc(sy + 16384 + kk * 2048, 16384, 1024), kk);
    wg_commit();
    wg_wait<0>();
    reg_fence<32>(a);
    reg_fence<64>(b);
    reg_fence<32>(d);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = 16 * wl + g + 8 * r;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                c1[row * 64 + 8 * j + 2 * t + e] = a[4 * j + 2 * r + e];
                c3[row * 64 + 8 * j + 2 * t + e] = d[4 * j + 2 * r + e];
            }
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) c2[row * 128 + 8 * j + 2 * t + e] = b[4 * j + 2 * r + e];
    }
}

#define WG_ENTRY(NAME, ATOMIC)                                                                 \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                 \
        NAME(const bf16_t* qkv, const bf16_t* d_out, const float* lse2, const float* D,         \
             bf16_t* d_qkv, const int4* tiles, float* dqacc, int H, int Hkv, int Tpad,          \
             float scale) {                                                                     \
        flash_bwd_wg<ATOMIC>(qkv, d_out, lse2, D, d_qkv, tiles, dqacc, H, Hkv, Tpad, scale);    \
    }

#else  // not sm_90a: same entry points, never launched (the host checks the architecture).

extern "C" __global__ void flash_wg_selftest(const bf16_t*, const bf16_t*, float*, float*,
                                             float*) {
    __trap();
}
#define WG_ENTRY(NAME, ATOMIC)                                                                 \
    extern "C" __global__ void NAME(const bf16_t*, const bf16_t*, const float*, const float*,   \
                                    bf16_t*, const int4*, float*, int, int, int, float) {       \
        __trap();                                                                               \
    }

#endif

WG_ENTRY(flash_bwd_wg_128, false)
