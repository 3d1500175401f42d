// prelude.cuh: prepended to every kernel file by compile.rs.
// Owns the element types and conversions, the compute type chosen by -DNOPAD_BF16, the naming
// macro for dtype-suffixed entry points, and warp/block reductions. No host headers: NVRTC only.
//
// bf16 is stored as a 16-bit integer: widening is an exact shift, narrowing rounds to nearest
// even (NaN stays NaN), so no cuda_bf16.h is needed.

typedef unsigned short bf16_t;
typedef long long i64;

__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((unsigned)x) << 16);
}
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

#if NOPAD_BF16
typedef bf16_t compute_t;
#define KNAME(base) base##_bf16
__device__ __forceinline__ float ld(const compute_t* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ compute_t to_c(float x) { return f32_to_bf16(x); }
#else
typedef float compute_t;
#define KNAME(base) base##_f32
__device__ __forceinline__ float ld(const compute_t* p, i64 i) { return p[i]; }
__device__ __forceinline__ compute_t to_c(float x) { return x; }
#endif

// x rounded to compute_t and widened back (what storing and reloading it gives).
__device__ __forceinline__ float round_c(float x) {
#if NOPAD_BF16
    return bf16_to_f32(f32_to_bf16(x));
#else
    return x;
#endif
}

#define INF_F __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Reduce over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `Warp::op` is the warp reduction, `identity` fills the lanes past the last warp.
// `scratch` holds 32 floats; the function synchronises before returning, so it can be reused.
template <class Warp>
__device__ __forceinline__ float block_reduce(float v, float identity, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = Warp::op(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : identity;
    t = Warp::op(t);
    return t;
}
struct WarpSum { static __device__ __forceinline__ float op(float v) { return warp_sum(v); } };
struct WarpMax { static __device__ __forceinline__ float op(float v) { return warp_max(v); } };
__device__ float block_sum(float v, float* scratch) { return block_reduce<WarpSum>(v, 0.f, scratch); }
__device__ float block_max(float v, float* scratch) { return block_reduce<WarpMax>(v, -INF_F, scratch); }

// Eight consecutive compute_t elements as floats, in one 16-byte access (bf16) or two (f32).
// The address p + i must be 16-byte aligned; launchers check before choosing a *_v8 kernel.
struct f8 { float v[8]; };
__device__ __forceinline__ f8 ld8(const compute_t* p, i64 i) {
    f8 r;
#if NOPAD_BF16
    uint4 u = *(const uint4*)(p + i);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        r.v[2 * k] = __uint_as_float(w[k] << 16);
        r.v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
#else
    float4 a = *(const float4*)(p + i), b = *(const float4*)(p + i + 4);
    r.v[0] = a.x; r.v[1] = a.y; r.v[2] = a.z; r.v[3] = a.w;
    r.v[4] = b.x; r.v[5] = b.y; r.v[6] = b.z; r.v[7] = b.w;
#endif
    return r;
}
__device__ __forceinline__ void st8(compute_t* p, i64 i, const f8& r) {
#if NOPAD_BF16
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
        w[k] = (unsigned)f32_to_bf16(r.v[2 * k]) | ((unsigned)f32_to_bf16(r.v[2 * k + 1]) << 16);
    *(uint4*)(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
#else
    *(float4*)(p + i) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
    *(float4*)(p + i + 4) = make_float4(r.v[4], r.v[5], r.v[6], r.v[7]);
#endif
}
