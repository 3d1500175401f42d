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

#if NOPAD_BF16
// Gradient loads: fp32 or bf16 gradients (CudaOptions::bf16_grads), 1 or 4 at a time.
__device__ __forceinline__ float ldg1(const float* g, i64 i) { return g[i]; }
__device__ __forceinline__ float ldg1(const bf16_t* g, i64 i) { return bf16_to_f32(g[i]); }
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
