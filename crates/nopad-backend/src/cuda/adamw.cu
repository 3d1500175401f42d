// adamw.cu: one AdamW step over a flat parameter range (multi-tensor: the whole flat buffer in
// one launch). m, v: [n] f32; grad: [n] f32 (bf16 for *_g16); param: [n] compute_t;
// master_lo: [n] u16 or null.
// With master_lo (bf16 only) the fp32 master weight is (param << 16) + sign_extend(master_lo)
// (see adamw.rs); the update is applied to it and both halves are written back. Without, param
// itself is updated. Bias corrections are computed on the host (as the CPU backend does).

struct AdamwParams {
    compute_t* param;
    unsigned short* master_lo;
    const void* grad;   // float*, or bf16_t* with bf16 gradients (the *_g16 kernels)
    float* m;
    float* v;
    i64 n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float grad_scale;
    float decay;      // 1 - lr * weight_decay
    float step_size;  // lr / (1 - beta1^step)
    float bc2_sqrt;   // sqrt(1 - beta2^step)
};

// One element: the same arithmetic, in the same order, as torch.optim.AdamW (and the CPU
// backend). Returns the new weight; m and v are updated in place.
__device__ __forceinline__ float adamw_one(const AdamwParams& p, float g, float w, float& m, float& v) {
    g *= p.grad_scale;
    w *= p.decay;
    m = m * p.beta1 + g * (1.f - p.beta1);
    v = v * p.beta2 + g * g * (1.f - p.beta2);
    float denom = sqrtf(v) / p.bc2_sqrt + p.eps;
    return w - p.step_size * m / denom;
}

__device__ __forceinline__ float master_join(unsigned short hi, unsigned short lo) {
    return __uint_as_float(((unsigned)hi << 16) + (unsigned)(int)(short)lo);
}
__device__ __forceinline__ void master_split(float w, unsigned short& hi, unsigned short& lo) {
    unsigned u = __float_as_uint(w), h = (u + 0x8000u) >> 16;
    hi = (unsigned short)h;
    lo = (unsigned short)(u - (h << 16));
}

// Gradient loads: fp32 or bf16 gradients (CudaOptions::bf16_grads), 1 or 4 at a time.
__device__ __forceinline__ float ldg1(const float* g, i64 i) { return g[i]; }
__device__ __forceinline__ float ldg1(const bf16_t* g, i64 i) { return bf16_to_f32(g[i]); }

#if NOPAD_BF16
__device__ __forceinline__ void ldg4(const float* g, i64 i4, float* out) {
    float4 v = ((const float4*)g)[i4];
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
__device__ __forceinline__ void ldg4(const bf16_t* g, i64 i4, float* out) {
    uint2 v = ((const uint2*)g)[i4];
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
}

// Split-master path, 4 elements per thread with 16-byte (fp32) and 8-byte (16-bit) accesses:
// 28 bytes per parameter with fp32 gradients, 26 with bf16. The launcher guarantees alignment;
// elements past n/4*4 are done by the first threads one by one.
template <typename G>
__device__ void adamw_split4_impl(const AdamwParams& p, const G* grad) {
    i64 n4 = p.n / 4;
    float4* m4 = (float4*)p.m;
    float4* v4 = (float4*)p.v;
    uint2* w4 = (uint2*)p.param;
    uint2* l4 = (uint2*)p.master_lo;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n4; i += (i64)gridDim.x * blockDim.x) {
        float gs[4];
        ldg4(grad, i, gs);
        float4 m = m4[i], v = v4[i];
        uint2 wh = w4[i], wl = l4[i];
        float ms[4] = {m.x, m.y, m.z, m.w}, vs[4] = {v.x, v.y, v.z, v.w};
        unsigned short hs[4] = {(unsigned short)(wh.x & 0xffff), (unsigned short)(wh.x >> 16),
                                (unsigned short)(wh.y & 0xffff), (unsigned short)(wh.y >> 16)};
        unsigned short ls[4] = {(unsigned short)(wl.x & 0xffff), (unsigned short)(wl.x >> 16),
                                (unsigned short)(wl.y & 0xffff), (unsigned short)(wl.y >> 16)};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            float w = adamw_one(p, gs[k], master_join(hs[k], ls[k]), ms[k], vs[k]);
            master_split(w, hs[k], ls[k]);
        }
        m4[i] = make_float4(ms[0], ms[1], ms[2], ms[3]);
        v4[i] = make_float4(vs[0], vs[1], vs[2], vs[3]);
        w4[i] = make_uint2(hs[0] | ((unsigned)hs[1] << 16), hs[2] | ((unsigned)hs[3] << 16));
        l4[i] = make_uint2(ls[0] | ((unsigned)ls[1] << 16), ls[2] | ((unsigned)ls[3] << 16));
    }
    i64 t = n4 * 4 + blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (t < p.n) {
        float m = p.m[t], v = p.v[t];
        float w = adamw_one(p, ldg1(grad, t), master_join(p.param[t], p.master_lo[t]), m, v);
        p.m[t] = m;
        p.v[t] = v;
        master_split(w, p.param[t], p.master_lo[t]);
    }
}

// The same one element per thread, for views that are not aligned for the 4-wide kernel.
template <typename G>
__device__ void adamw_split1_impl(const AdamwParams& p, const G* grad) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        float m = p.m[i], v = p.v[i];
        float w = adamw_one(p, ldg1(grad, i), master_join(p.param[i], p.master_lo[i]), m, v);
        p.m[i] = m;
        p.v[i] = v;
        master_split(w, p.param[i], p.master_lo[i]);
    }
}

extern "C" __global__ void KNAME(adamw_split4)(const AdamwParams p) { adamw_split4_impl(p, (const float*)p.grad); }
extern "C" __global__ void KNAME(adamw_split1)(const AdamwParams p) { adamw_split1_impl(p, (const float*)p.grad); }
extern "C" __global__ void KNAME(adamw_split4_g16)(const AdamwParams p) { adamw_split4_impl(p, (const bf16_t*)p.grad); }
extern "C" __global__ void KNAME(adamw_split1_g16)(const AdamwParams p) { adamw_split1_impl(p, (const bf16_t*)p.grad); }
#endif

// Without a master copy (f32 mode): the parameters themselves.
extern "C" __global__ void KNAME(adamw)(const AdamwParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        float m = p.m[i], v = p.v[i];
        float w = adamw_one(p, ((const float*)p.grad)[i], ld(p.param, i), m, v);
        p.m[i] = m;
        p.v[i] = v;
        p.param[i] = to_c(w);
    }
}

// ---- Low-precision optimizer states (adamw_states.rs) ---------------------------------------
// Moments: MOM_F32 float[n]; MOM_BF16 bf16 bits [n], rounded to nearest even on store; MOM_Q8
// u8 codes [n] into a 256-entry map (signed for m, unsigned for v) with one float scale per 256
// values (block-wise dynamic quantisation). Weights: W_PLAIN the parameter itself (to_c),
// W_SPLIT the split fp32 master (bf16 only), W_SR the parameter rounded stochastically to bf16.
// Every function mirrors one in src/optim/codes.rs operation for operation, so the CPU computes
// the same codes and bits.
//
// One thread per element, one 256-thread block per quantisation block: the 8-bit path updates
// its 256 values in registers, reduces their new largest magnitudes over the block (warp
// shuffles, then 8 warp results through shared memory), then quantises, so a state is read and
// written once. Bytes per parameter (8-bit moments, bf16 weights): read grad (4, or 2 with bf16
// gradients) + param 2 + master low half 2 (W_SPLIT) + 2 codes + 8/256 of scales, write param 2
// + low half 2 + 2 codes + scales: about 16 with split master and bf16 gradients, 12 without a
// master (against 26 for fp32 moments). Memory-bound, one pass.

#define MOM_F32 0
#define MOM_BF16 1
#define MOM_Q8 2
#define W_PLAIN 0
#define W_SPLIT 1
#define W_SR 2

struct AdamwStatesParams {
    AdamwParams a;             // m, v point to float, bf16_t or unsigned char
    float* m_scale;            // MOM_Q8: [ceil(n/256)]
    float* v_scale;
    unsigned long long sr_key; // W_SR: the step's key (codes.rs sr_key)
    unsigned long long sr_base;  // W_SR: flat index of element 0
    float map_m[256];          // MOM_Q8: code maps, sorted ascending
    float map_v[256];
};

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// codes.rs round_bf16_stochastic: up with probability (low 16 bits)/2^16, from 16 hashed bits.
__device__ __forceinline__ float round_bf16_sr(float w, unsigned long long key, unsigned long long idx) {
    unsigned u = __float_as_uint(w);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(0x7fc00000u);
    unsigned r = (u & 0x7f800000u) == 0x7f800000u ? 0u : (unsigned)(mix64(key + idx) >> 48);
    return __uint_as_float((u + r) & 0xffff0000u);
}

// codes.rs nearest_code: the largest code <= x by a branch-free binary search, then the nearer
// of it and the next (the lower on a tie).
__device__ __forceinline__ unsigned char nearest_code(const float* map, float x) {
    int i = 0;
#pragma unroll
    for (int s = 128; s > 0; s >>= 1)
        if (map[i + s] <= x) i += s;
    if (i < 255 && map[i + 1] - x < x - map[i]) ++i;
    return (unsigned char)i;
}

template <int MOM, int W, typename G>
__device__ void adamw_q_impl(const AdamwStatesParams& p, const G* grad) {
    __shared__ float map_m[256], map_v[256];
    __shared__ float red[2][8];
    const int t = threadIdx.x;
    if (MOM == MOM_Q8) {
        map_m[t] = p.map_m[t];
        map_v[t] = p.map_v[t];
        __syncthreads();
    }
    i64 nblocks = (p.a.n + 255) / 256;
    for (i64 b = blockIdx.x; b < nblocks; b += gridDim.x) {
        i64 i = b * 256 + t;
        bool live = i < p.a.n;
        float m = 0.f, v = 0.f;
        if (live) {
            if (MOM == MOM_F32) {
                m = p.a.m[i];
                v = p.a.v[i];
            } else if (MOM == MOM_BF16) {
                m = bf16_to_f32(((const bf16_t*)p.a.m)[i]);
                v = bf16_to_f32(((const bf16_t*)p.a.v)[i]);
            } else {
                m = map_m[((const unsigned char*)p.a.m)[i]] * p.m_scale[b];
                v = map_v[((const unsigned char*)p.a.v)[i]] * p.v_scale[b];
            }
            bf16_t* hi = (bf16_t*)p.a.param;
            float w = W == W_SPLIT ? master_join(hi[i], p.a.master_lo[i]) : ld(p.a.param, i);
            w = adamw_one(p.a, ldg1(grad, i), w, m, v);
            if (W == W_SPLIT) master_split(w, hi[i], p.a.master_lo[i]);
            else if (W == W_SR) p.a.param[i] = to_c(round_bf16_sr(w, p.sr_key, p.sr_base + i));
            else p.a.param[i] = to_c(w);
        }
        if (MOM == MOM_Q8) {
            // The block's new scales: largest magnitudes of the updated values (0 past n).
            float am = warp_max(fabsf(m)), av = warp_max(fabsf(v));
            if ((t & 31) == 0) {
                red[0][t >> 5] = am;
                red[1][t >> 5] = av;
            }
            __syncthreads();
            am = red[0][0];
            av = red[1][0];
#pragma unroll
            for (int k = 1; k < 8; ++k) {
                am = fmaxf(am, red[0][k]);
                av = fmaxf(av, red[1][k]);
            }
            __syncthreads();  // red is reused by the next block
            if (live) {
                ((unsigned char*)p.a.m)[i] = nearest_code(map_m, am > 0.f ? m / am : 0.f);
                ((unsigned char*)p.a.v)[i] = nearest_code(map_v, av > 0.f ? v / av : 0.f);
            }
            if (t == 0) {
                p.m_scale[b] = am;
                p.v_scale[b] = av;
            }
        } else if (live) {
            if (MOM == MOM_F32) {
                p.a.m[i] = m;
                p.a.v[i] = v;
            } else {
                ((bf16_t*)p.a.m)[i] = f32_to_bf16(m);
                ((bf16_t*)p.a.v)[i] = f32_to_bf16(v);
            }
        }
    }
}

#define ADAMW_Q(MOM, W, mname, wname)                                                              \
    extern "C" __global__ void __launch_bounds__(256) KNAME(adamw_q_##mname##_##wname)(            \
        const AdamwStatesParams p) { adamw_q_impl<MOM, W>(p, (const float*)p.a.grad); }           \
    extern "C" __global__ void __launch_bounds__(256) KNAME(adamw_q_##mname##_##wname##_g16)(      \
        const AdamwStatesParams p) { adamw_q_impl<MOM, W>(p, (const bf16_t*)p.a.grad); }

ADAMW_Q(MOM_F32, W_SR, f32, sr)
ADAMW_Q(MOM_BF16, W_PLAIN, bf16, plain)
ADAMW_Q(MOM_BF16, W_SR, bf16, sr)
ADAMW_Q(MOM_Q8, W_PLAIN, q8, plain)
ADAMW_Q(MOM_Q8, W_SR, q8, sr)
#if NOPAD_BF16
ADAMW_Q(MOM_BF16, W_SPLIT, bf16, split)
ADAMW_Q(MOM_Q8, W_SPLIT, q8, split)
#endif
