// common.cuh: device helpers shared by every nopad-flash kernel (prepended to each .cu).
//
// bf16 is carried as `unsigned short` and converted with PTX `cvt`, so the sources compile under
// NVRTC with no CUDA headers. Tensor-core helpers wrap `mma.sync.m16n8k16` (bf16 in, fp32
// accumulate), `ldmatrix` and `cp.async`; fragment layouts are those of docs/FLASH.md section 5.
//
// Shared tiles are `[rows][DH]` bf16 with 16-byte chunk c of row r stored at chunk
// `c ^ (r & 7)`, so the 8 row addresses of one ldmatrix (and the cp.async stores) hit all banks.
// Tile descriptors (`int4`) are `{seq_start, seq_len, tile_index, pad_start}` built by the host.

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define FLASH_INF __int_as_float(0x7f800000)
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ float bf2f(bf16_t x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ bf16_t f2bf(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
// Two floats to a bf16 pair; `lo` lands in the low 16 bits (the lower column).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ float bf_lo(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf_hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// C[16x8] += A[16x16] * B[16x8]; bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// 16-byte async copy; `pred == false` zero-fills the destination and reads nothing.
__device__ __forceinline__ void cp_async16(u32 saddr, const void* g, bool pred) {
    int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(saddr), "l"(g), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// p[0] += a, p[1] += b in global memory: one vector reduction on sm_90 (p 8-byte aligned), two
// scalar atomics before (so the module still builds for sm_80/sm_89).
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// p[0..3] += {a, b, c, d}: one 16-byte vector reduction on sm_90 (p 16-byte aligned).
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(a), "f"(b),
                 "f"(c), "f"(d)
                 : "memory");
#else
    red_add_v2(p, a, b);
    red_add_v2(p + 2, c, d);
#endif
}

// Element offset of 16-byte chunk `c` of row `r` in a swizzled [rows][DH] tile.
template <int DH>
__device__ __forceinline__ int swz(int r, int c) {
    return r * DH + ((c ^ (r & 7)) << 3);
}

// Copy rows [0, ROWS) of a strided bf16 matrix into a swizzled tile; rows >= rows_valid are
// zero-filled (never read). `g` must point at a readable row 0. Thread `tid` copies chunk
// `tid % CPR` of rows `tid / CPR + it * RPI`; RPI is a multiple of 8, so the swizzle is the same
// for all its rows: one shared address plus immediates, one global pointer stepped by RPI rows.
template <int ROWS, int DH, int NT>
__device__ __forceinline__ void load_tile(bf16_t* s, const bf16_t* g, long long row_stride,
                                          int rows_valid, int tid) {
    constexpr int CPR = DH / 8;
    constexpr int RPI = NT / CPR;
    static_assert(NT % CPR == 0 && RPI % 8 == 0 && ROWS % RPI == 0,
                  "tile chunks must divide evenly over the block");
    const int r0 = tid / CPR, c = tid % CPR;
    const u32 s0 = smem_u32(s + swz<DH>(r0, c));
    const bf16_t* src = g + (long long)r0 * row_stride + c * 8;
    const long long step = (long long)RPI * row_stride;
#pragma unroll
    for (int it = 0; it < ROWS / RPI; ++it) {
        bool p = r0 + it * RPI < rows_valid;
        cp_async16(s0 + it * RPI * DH * 2, p ? src : g, p);
        src += step;
    }
}

// ldmatrix addresses for a warp (lane `l`) in a swizzled [rows][DH] tile `base` (shared address).
// A operand, rows r0..r0+15, k-slice kk (columns 16kk..16kk+15).
template <int DH>
__device__ __forceinline__ u32 addr_a(u32 base, int r0, int kk, int l) {
    int r = r0 + (l & 15);
    return base + 2 * swz<DH>(r, 2 * kk + (l >> 4));
}
// B operand without .trans from a [n][k] tile: n-tiles n0 and n0+8, k-slice kk.
template <int DH>
__device__ __forceinline__ u32 addr_b(u32 base, int n0, int kk, int l) {
    int r = n0 + (l & 7) + ((l >> 4) << 3);
    return base + 2 * swz<DH>(r, 2 * kk + ((l >> 3) & 1));
}
// B operand with .trans from a [k][n] tile: k rows k0..k0+15, n columns 16np..16np+15.
template <int DH>
__device__ __forceinline__ u32 addr_bt(u32 base, int k0, int np, int l) {
    int r = k0 + (l & 15);
    return base + 2 * swz<DH>(r, 2 * np + (l >> 4));
}

// Per-lane ldmatrix addressing without hoisted address registers. A warp's ldmatrix rows are
// `r0 + (lane-dependent part)` with r0 a multiple of 8, so the swizzle term `r & 7` is a lane
// constant and chunk `2 c2 + b` (c2 = 16-column slice, b a lane bit) lands at
// `((2 c2) ^ y) << 4` bytes with y = b ^ (r & 7): for c2 = 4 ch + cl that is
// `128 ch + ((2 cl ^ y) << 4)`. So four per-lane offsets (cl = 0..3) plus compile-time
// immediates give every address of a tile. Without this the compiler hoisted one register per
// distinct (row block, slice) address out of the loops (56 in flash_fwd_128) and spilled.
// `refresh()` (an opaque move, once per loop iteration) stops it from hoisting the sums again.
template <int DH>
struct SwzAddr {
    u32 o[4];
    // A-pattern (ldmatrix x4 of a 16x16 block: rows l & 15, chunk bit l >> 4; also the
    // .trans B operand of addr_bt) when `b_pattern` is false; B-pattern (two n8 blocks: rows
    // (l & 7) + 8 (l >> 4), chunk bit (l >> 3) & 1) when true.
    __device__ __forceinline__ void init(u32 base, int l, bool b_pattern) {
        int row = b_pattern ? (l & 7) + ((l >> 4) << 3) : (l & 15);
        int y = (b_pattern ? ((l >> 3) & 1) : (l >> 4)) ^ (l & 7);
#pragma unroll
        for (int cl = 0; cl < 4; ++cl) o[cl] = base + row * DH * 2 + (((2 * cl) ^ y) << 4);
    }
    __device__ __forceinline__ void refresh() {
#pragma unroll
        for (int cl = 0; cl < 4; ++cl) asm volatile("mov.b32 %0, %0;" : "+r"(o[cl]));
    }
    // Rows r0.. (r0 % 8 == 0), 16-column slice c2; both compile-time after unrolling.
    __device__ __forceinline__ u32 at(int r0, int c2) const {
        return o[c2 & 3] + r0 * DH * 2 + (c2 >> 2) * 128;
    }
};

