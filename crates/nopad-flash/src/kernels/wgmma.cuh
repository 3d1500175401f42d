// wgmma.cuh: Hopper warpgroup-MMA helpers (sm_90a), prepended after common.cuh to the forward
// and backward modules. Everything here exists only where FLASH_WGMMA is defined (NVRTC targets
// sm_90a); kernels built on it trap elsewhere and the host never launches them there.
//
// Shared tiles use wgmma's 128-byte swizzle ("SW128"): a [rows][128] bf16 tile is two [rows][64]
// column blocks (rows * 128 bytes apart), row r's 16-byte chunk c at chunk c ^ (r & 7), every
// block 1024-byte aligned. A K-major operand (contiguous along k) is described by its start
// (+32 bytes per 16-column k step inside a block) and SBO = 1024 (8-row groups); an MN-major one
// (contiguous along m or n) by its start (+2048 bytes per 16-row k step), SBO = 1024 (8 k rows)
// and LBO = the stride between 64-wide m / n blocks. `flash_wg_selftest` (bwd_wgmma_long.cu) checks
// these conventions against CPU products.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_WGMMA 1
#endif

#ifdef FLASH_WGMMA
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Generic-proxy shared-memory writes (cp.async, st.shared) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// Pins accumulator registers at this point of the program (the compiler must not move their
// uses across the wgmma issue / wait, which it cannot see through).
template <int N>
__device__ __forceinline__ void reg_fence(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle: start, leading / stride byte offsets.
__device__ __forceinline__ unsigned long long wg_desc(u32 addr, u32 lbo, u32 sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// Copy rows [0, ROWS) of a strided [.][DH] bf16 matrix (DH 64 or 128) into an SW128 tile at
// shared address s; rows >= rows_valid are zero-filled. Thread tid copies 16-byte chunk
// tid % (DH / 8) of rows tid / (DH / 8) + RPI it.
template <int ROWS, int DH, int NT>
__device__ __forceinline__ void load_tile_sw(u32 s, const bf16_t* g, long long row_stride,
                                             int rows_valid, int tid) {
    constexpr int CPR = DH / 8;
    constexpr int RPI = NT / CPR;
    static_assert(NT % CPR == 0 && RPI % 8 == 0 && ROWS % RPI == 0, "uneven tile copy");
    const int r0 = tid / CPR, c = tid % CPR;
    const u32 s0 = s + (c >> 3) * ROWS * 128 + r0 * 128 + (((c & 7) ^ (r0 & 7)) << 4);
    const bf16_t* src = g + (long long)r0 * row_stride + c * 8;
    const long long step = (long long)RPI * row_stride;
#pragma unroll
    for (int it = 0; it < ROWS / RPI; ++it) {
        bool p = r0 + it * RPI < rows_valid;
        cp_async16(s0 + it * RPI * 128, p ? src : g, p);
        src += step;
    }
}

__device__ __forceinline__ void st_shared_b32(u32 addr, u32 v) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ u32 ld_shared_b32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
    return v;
}

// D[64][64] (+)= A[64][16] B[16][64]; A, B from shared memory (descriptors); D = 32 fp32
// per thread in the m16n8 accumulator layout per warp (warp w of the group: rows 16w..16w+15).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_64x64(float* d, unsigned long long da, unsigned long long db,
                                            int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
}

// D[64][128] (+)= A[64][16] B[16][128]; A, B from shared memory (descriptors); D = 64 fp32
// per thread in the m16n8 accumulator layout per warp (warp w of the group: rows 16w..16w+15).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_64x128(float* d, unsigned long long da, unsigned long long db,
                                            int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %68;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
}

// D[64][128] (+)= A[64][16] B[16][128]; A from registers (a[4]: this warp's 16 rows in the
// m16n8k16 A-fragment layout), B from shared memory (descriptor).
template <int TB>
__device__ __forceinline__ void wgmma_64x128_rs(float* d, const u32* a, unsigned long long db,
                                               int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB));
}

// D[64][64] (+)= A[64][16] B[16][64]; A from registers (a[4]: this warp's 16 rows in the
// m16n8k16 A-fragment layout), B from shared memory (descriptor).
template <int TB>
__device__ __forceinline__ void wgmma_64x64_rs(float* d, const u32* a, unsigned long long db,
                                              int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TB));
}

// Width-generic forms: N = 64 or 128 (the head dim of an O, dQ, dK or dV accumulator).
template <int N, int TA, int TB>
__device__ __forceinline__ void wgmma_ss(float* d, unsigned long long da, unsigned long long db,
                                         int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma width 64 or 128");
    if constexpr (N == 64) wgmma_64x64<TA, TB>(d, da, db, accumulate);
    else wgmma_64x128<TA, TB>(d, da, db, accumulate);
}
template <int N, int TB>
__device__ __forceinline__ void wgmma_rs(float* d, const u32* a, unsigned long long db,
                                         int accumulate) {
    static_assert(N == 64 || N == 128, "wgmma width 64 or 128");
    if constexpr (N == 64) wgmma_64x64_rs<TB>(d, a, db, accumulate);
    else wgmma_64x128_rs<TB>(d, a, db, accumulate);
}

// D[64][64] = A B^T with A, B two [64][DH] SW128 tiles given by K-major descriptors of their
// starts: k step kk lies in 64-column block kk / 4 (8 KB apart), 32 bytes further per step.
template <int DH>
__device__ __forceinline__ void wgmma_64x64_tiles(float* d, unsigned long long da,
                                                  unsigned long long db) {
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
        const u32 o = ((kk >> 2) * (64 * 128) + (kk & 3) * 32) >> 4;
        wgmma_64x64<0, 0>(d, da + o, db + o, kk);
    }
}

#endif  // FLASH_WGMMA
