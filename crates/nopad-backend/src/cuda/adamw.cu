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
// Two kernels per mode, which store the same bits (same arithmetic per element, same block
// maxima, same codes, same random bits per element index):
// - adamw_q_*_v8: 8 consecutive elements per thread with 16-byte accesses (8 for codes), one
//   warp per quantisation block (32 x 8 = 256), so a block's new largest magnitudes are reduced
//   with warp shuffles alone, without shared memory or __syncthreads; the codes are found on
//   a search tree of the map (nearest_code_tree). The launcher takes it when every pointer is
//   16-byte aligned; a thread whose 8 elements run past n does them one by one.
// - adamw_q_*: one thread per element, one 256-thread block per quantisation block (warp
//   shuffles, then 8 warp results through shared memory, two __syncthreads per block), for views
//   at any element.
// Both update a block's values in registers and quantise after the reduction, so a state is
// read and written once. Bytes per parameter with fp32 (bf16) gradients and bf16 weights: 8-bit
// moments 16 (14) with the split master (grad, param, low half, 2 codes read; param, low half,
// 2 codes written; 8/256 of scales), 12 (10) without; bf16 moments 20 (18) and 16 (14); fp32
// moments with the split master (adamw_split4) 28 (26).
//
// Estimate for the 1B shape (1.24e9 parameters, 8-bit moments, split master, bf16 gradients):
// 17 GB of HBM traffic, ~6 ms at ~3 TB/s; the scalar kernel was measured at ~19 ms. Its
// binary search loads map[i + s] with i a multiple of 2s, so the lanes of a level hit one bank
// (s >= 16) or 2-16 banks holding up to 8 of the candidates each: up to 1+2+4+8+8+8+8+8
// wavefronts for the 8 levels, plus ~3.5 each for the random map[i], map[i+1], ~54 per warp and
// code; with 2 codes and 2 dequantising loads (~3.5) per element, up to ~115 shared wavefronts
// per 32 elements, 4.5e9 in all: up to ~19 ms at one wavefront per clock on 132 SMs at
// 1.755 GHz, i.e. the search, not the traffic. The tree keeps level l in words 2^l..2^(l+1)-1,
// so a level spans consecutive banks: 1 wavefront for levels 0-5, at most 2 and 4 for levels 6
// and 7, and the two neighbours come out of the comparisons: at most 12 per code, ~31 per 32
// elements with the dequantising loads, 1.2e9 in all, at most ~5 ms. Issue: ~190 instructions
// per element (2 searches of ~7 per level, 3 IEEE divisions and a square root, dequantising,
// master halves, packing), 7.4e9 warp instructions over 528 schedulers: ~8 ms. So the v8 kernel
// should take ~8-9 ms instead of ~19 (bf16 moments, no search: 22 GB, ~7.5 ms; fp32: 32 GB).

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

// nearest_code on the map's search tree: tree[0] = map[0], tree[2^l + j] = map[(2j+1)(128 >> l)]
// (level l, step s = 128 >> l). With k = 2^l + i/(2s) the binary search's comparison
// map[i + s] <= x is tree[k] <= x and taking it is k = 2k + 1, so the same 8 comparisons give
// the same i = k - 256. The last comparison taken was map[i] (none: i = 0, map[0] = tree[0]);
// the last not taken was map[i + 1] (all taken: i = 255, not needed): the final test reads the
// same two values, with no further load.
__device__ __forceinline__ unsigned char nearest_code_tree(const float* tree, float x) {
    int k = 1;
    float lo = tree[0], hi = 0.f;
#pragma unroll
    for (int l = 0; l < 8; ++l) {
        float e = tree[k];
        bool up = e <= x;
        k = 2 * k + (up ? 1 : 0);
        lo = up ? e : lo;
        hi = up ? hi : e;
    }
    int i = k - 256;
    if (i < 255 && hi - x < x - lo) ++i;
    return (unsigned char)i;
}

// Where tree[t] comes from in the map (see nearest_code_tree).
__device__ __forceinline__ int tree_source(int t) {
    if (t == 0) return 0;
    int l = 31 - __clz(t);
    return (2 * (t - (1 << l)) + 1) * (128 >> l);
}

// ---- One element, as both kernels read and write it ----

// The update's inputs at element i: gradient, weight, moments (codes dequantised with the
// block's scales sm, sv).
template <int MOM, int W, typename G>
__device__ __forceinline__ void load1(const AdamwStatesParams& p, const G* grad, const float* map_m,
                                      const float* map_v, float sm, float sv, i64 i, float& g,
                                      float& w, float& m, float& v) {
    if (MOM == MOM_F32) {
        m = p.a.m[i];
        v = p.a.v[i];
    } else if (MOM == MOM_BF16) {
        m = bf16_to_f32(((const bf16_t*)p.a.m)[i]);
        v = bf16_to_f32(((const bf16_t*)p.a.v)[i]);
    } else {
        m = map_m[((const unsigned char*)p.a.m)[i]] * sm;
        v = map_v[((const unsigned char*)p.a.v)[i]] * sv;
    }
    const bf16_t* hi = (const bf16_t*)p.a.param;
    w = W == W_SPLIT ? master_join(hi[i], p.a.master_lo[i]) : ld(p.a.param, i);
    g = ldg1(grad, i);
}

template <int W>
__device__ __forceinline__ void store_w1(const AdamwStatesParams& p, i64 i, float w) {
    bf16_t* hi = (bf16_t*)p.a.param;
    if (W == W_SPLIT) master_split(w, hi[i], p.a.master_lo[i]);
    else if (W == W_SR) p.a.param[i] = to_c(round_bf16_sr(w, p.sr_key, p.sr_base + i));
    else p.a.param[i] = to_c(w);
}

// fp32 or bf16 moments (8-bit codes are stored after the block's reduction).
template <int MOM>
__device__ __forceinline__ void store_mv1(const AdamwStatesParams& p, i64 i, float m, float v) {
    if (MOM == MOM_F32) {
        p.a.m[i] = m;
        p.a.v[i] = v;
    } else {
        ((bf16_t*)p.a.m)[i] = f32_to_bf16(m);
        ((bf16_t*)p.a.v)[i] = f32_to_bf16(v);
    }
}

// ---- Eight consecutive elements (p + i 16-byte aligned; 8-byte for codes) ----

__device__ __forceinline__ void ld8_u16(const unsigned short* p, i64 i, unsigned short* out) {
    uint4 u = *(const uint4*)(p + i);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[2 * k] = (unsigned short)(w[k] & 0xffffu);
        out[2 * k + 1] = (unsigned short)(w[k] >> 16);
    }
}
__device__ __forceinline__ void st8_u16(unsigned short* p, i64 i, const unsigned short* in) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = (unsigned)in[2 * k] | ((unsigned)in[2 * k + 1] << 16);
    *(uint4*)(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void ld8_f32(const float* p, i64 i, float* out) {
    float4 a = *(const float4*)(p + i), b = *(const float4*)(p + i + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ void st8_f32(float* p, i64 i, const float* in) {
    *(float4*)(p + i) = make_float4(in[0], in[1], in[2], in[3]);
    *(float4*)(p + i + 4) = make_float4(in[4], in[5], in[6], in[7]);
}
__device__ __forceinline__ void ld8_u8(const unsigned char* p, i64 i, unsigned char* out) {
    uint2 u = *(const uint2*)(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[k] = (unsigned char)(u.x >> (8 * k));
        out[k + 4] = (unsigned char)(u.y >> (8 * k));
    }
}
__device__ __forceinline__ void st8_u8(unsigned char* p, i64 i, const unsigned char* in) {
    unsigned x = 0, y = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        x |= (unsigned)in[k] << (8 * k);
        y |= (unsigned)in[k + 4] << (8 * k);
    }
    *(uint2*)(p + i) = make_uint2(x, y);
}
__device__ __forceinline__ void ldg8(const float* g, i64 i, float* out) { ld8_f32(g, i, out); }
__device__ __forceinline__ void ldg8(const bf16_t* g, i64 i, float* out) {
    unsigned short h[8];
    ld8_u16(g, i, h);
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = bf16_to_f32(h[k]);
}

// load1 for elements i..i+7.
template <int MOM, int W, typename G>
__device__ __forceinline__ void load8(const AdamwStatesParams& p, const G* grad, const float* map_m,
                                      const float* map_v, float sm, float sv, i64 i, float* g,
                                      float* w, float* m, float* v) {
    if (MOM == MOM_F32) {
        ld8_f32(p.a.m, i, m);
        ld8_f32(p.a.v, i, v);
    } else if (MOM == MOM_BF16) {
        unsigned short a[8], b[8];
        ld8_u16((const bf16_t*)p.a.m, i, a);
        ld8_u16((const bf16_t*)p.a.v, i, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            m[k] = bf16_to_f32(a[k]);
            v[k] = bf16_to_f32(b[k]);
        }
    } else {
        unsigned char a[8], b[8];
        ld8_u8((const unsigned char*)p.a.m, i, a);
        ld8_u8((const unsigned char*)p.a.v, i, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            m[k] = map_m[a[k]] * sm;
            v[k] = map_v[b[k]] * sv;
        }
    }
    if (W == W_SPLIT) {
        unsigned short hi[8], lo[8];
        ld8_u16((const bf16_t*)p.a.param, i, hi);
        ld8_u16(p.a.master_lo, i, lo);
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = master_join(hi[k], lo[k]);
    } else {
        f8 x = ld8(p.a.param, i);
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = x.v[k];
    }
    ldg8(grad, i, g);
}

// store_w1 for elements i..i+7.
template <int W>
__device__ __forceinline__ void store_w8(const AdamwStatesParams& p, i64 i, const float* w) {
    if (W == W_SPLIT) {
        unsigned short hi[8], lo[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) master_split(w[k], hi[k], lo[k]);
        st8_u16((bf16_t*)p.a.param, i, hi);
        st8_u16(p.a.master_lo, i, lo);
    } else {
        f8 x;
#pragma unroll
        for (int k = 0; k < 8; ++k)
            x.v[k] = W == W_SR ? round_bf16_sr(w[k], p.sr_key, p.sr_base + i + k) : w[k];
        st8(p.a.param, i, x);  // to_c of each
    }
}

// store_mv1 for elements i..i+7.
template <int MOM>
__device__ __forceinline__ void store_mv8(const AdamwStatesParams& p, i64 i, const float* m, const float* v) {
    if (MOM == MOM_F32) {
        st8_f32(p.a.m, i, m);
        st8_f32(p.a.v, i, v);
    } else {
        unsigned short a[8], b[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            a[k] = f32_to_bf16(m[k]);
            b[k] = f32_to_bf16(v[k]);
        }
        st8_u16((bf16_t*)p.a.m, i, a);
        st8_u16((bf16_t*)p.a.v, i, b);
    }
}

// ---- The kernels ----

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
            float sm = MOM == MOM_Q8 ? p.m_scale[b] : 0.f, sv = MOM == MOM_Q8 ? p.v_scale[b] : 0.f;
            float g, w;
            load1<MOM, W>(p, grad, map_m, map_v, sm, sv, i, g, w, m, v);
            store_w1<W>(p, i, adamw_one(p.a, g, w, m, v));
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
            store_mv1<MOM>(p, i, m, v);
        }
    }
}

// 8 elements per thread, warp w of the grid on quantisation blocks w, w + warps, ... Lane l
// holds elements 8l..8l+7 of the block; past n its values are 0, as in adamw_q_impl, so the
// block maxima are those of the same 256 values (fmaxf ignores the order and NaN alike).
template <int MOM, int W, typename G>
__device__ void adamw_q_v8_impl(const AdamwStatesParams& p, const G* grad) {
    __shared__ float map_m[256], map_v[256], tree_m[256], tree_v[256];
    if (MOM == MOM_Q8) {
        for (int t = threadIdx.x; t < 256; t += blockDim.x) {
            map_m[t] = p.map_m[t];
            map_v[t] = p.map_v[t];
            tree_m[t] = p.map_m[tree_source(t)];
            tree_v[t] = p.map_v[tree_source(t)];
        }
        __syncthreads();
    }
    const int lane = threadIdx.x & 31;
    const i64 nblocks = (p.a.n + 255) / 256;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks; b += warps) {
        const i64 i = b * 256 + lane * 8;
        const i64 left = p.a.n - i;
        const int live = left >= 8 ? 8 : left > 0 ? (int)left : 0;  // elements of this thread
        float sm = 0.f, sv = 0.f;
        if (MOM == MOM_Q8) {
            sm = p.m_scale[b];
            sv = p.v_scale[b];
        }
        float g[8], w[8], m[8], v[8];
        if (live == 8) {
            load8<MOM, W>(p, grad, map_m, map_v, sm, sv, i, g, w, m, v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                g[k] = w[k] = m[k] = v[k] = 0.f;
                if (k < live) load1<MOM, W>(p, grad, map_m, map_v, sm, sv, i + k, g[k], w[k], m[k], v[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k)
            if (k < live) w[k] = adamw_one(p.a, g[k], w[k], m[k], v[k]);
        if (live == 8) {
            store_w8<W>(p, i, w);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (k < live) store_w1<W>(p, i + k, w[k]);
        }
        if (MOM == MOM_Q8) {
            float am = fabsf(m[0]), av = fabsf(v[0]);
#pragma unroll
            for (int k = 1; k < 8; ++k) {
                am = fmaxf(am, fabsf(m[k]));
                av = fmaxf(av, fabsf(v[k]));
            }
            am = warp_max(am);
            av = warp_max(av);
            unsigned char cm[8], cv[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                cm[k] = nearest_code_tree(tree_m, am > 0.f ? m[k] / am : 0.f);
                cv[k] = nearest_code_tree(tree_v, av > 0.f ? v[k] / av : 0.f);
            }
            if (live == 8) {
                st8_u8((unsigned char*)p.a.m, i, cm);
                st8_u8((unsigned char*)p.a.v, i, cv);
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    if (k < live) {
                        ((unsigned char*)p.a.m)[i + k] = cm[k];
                        ((unsigned char*)p.a.v)[i + k] = cv[k];
                    }
                }
            }
            if (lane == 0) {
                p.m_scale[b] = am;
                p.v_scale[b] = av;
            }
        } else if (live == 8) {
            store_mv8<MOM>(p, i, m, v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; ++k)
                if (k < live) store_mv1<MOM>(p, i + k, m[k], v[k]);
        }
    }
}

#define ADAMW_Q1(MOM, W, name, impl)                                                               \
    extern "C" __global__ void __launch_bounds__(256) KNAME(name)(const AdamwStatesParams p) {     \
        impl<MOM, W>(p, (const float*)p.a.grad);                                                   \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) KNAME(name##_g16)(const AdamwStatesParams p) { \
        impl<MOM, W>(p, (const bf16_t*)p.a.grad);                                                  \
    }
// adamw_q_{moments}_{weights}[_g16] and its _v8 form.
#define ADAMW_Q(MOM, W, mname, wname)                                                              \
    ADAMW_Q1(MOM, W, adamw_q_##mname##_##wname, adamw_q_impl)                                      \
    ADAMW_Q1(MOM, W, adamw_q_##mname##_##wname##_v8, adamw_q_v8_impl)

ADAMW_Q(MOM_F32, W_SR, f32, sr)
ADAMW_Q(MOM_BF16, W_PLAIN, bf16, plain)
ADAMW_Q(MOM_BF16, W_SR, bf16, sr)
ADAMW_Q(MOM_Q8, W_PLAIN, q8, plain)
ADAMW_Q(MOM_Q8, W_SR, q8, sr)
#if NOPAD_BF16
ADAMW_Q(MOM_BF16, W_SPLIT, bf16, split)
ADAMW_Q(MOM_Q8, W_SPLIT, q8, split)
#endif
