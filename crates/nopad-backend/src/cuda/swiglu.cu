// swiglu.cu: a = silu(gate) * up and its backward.
// gu: [N, 2F] compute_t (gate then up per row); a, d_a: [N, F]. The backward works in place
// (out == gu): each thread reads its gate and up values before writing their gradients there.
// Flat grid over N*F; fp32 math.

struct SwigluParams {
    compute_t* out;        // fwd: a; bwd: d_gu
    const compute_t* gu;
    const compute_t* d_a;
    int n;
    int f;
};

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + expf(-g)); }

extern "C" __global__ void KNAME(swiglu_fwd)(const SwigluParams p) {
    i64 total = (i64)p.n * p.f;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t = idx / p.f, j = idx % p.f;
        float g = ld(p.gu, t * 2 * p.f + j), u = ld(p.gu, t * 2 * p.f + p.f + j);
        p.out[idx] = to_c(g * sigmoidf_(g) * u);
    }
}

extern "C" __global__ void KNAME(swiglu_bwd)(const SwigluParams p) {
    i64 total = (i64)p.n * p.f;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t = idx / p.f, j = idx % p.f;
        float g = ld(p.gu, t * 2 * p.f + j), u = ld(p.gu, t * 2 * p.f + p.f + j);
        float da = ld(p.d_a, idx);
        float sg = sigmoidf_(g);
        float silu = g * sg;
        p.out[t * 2 * p.f + j] = to_c(da * u * sg * (1.f + g * (1.f - sg)));
        p.out[t * 2 * p.f + p.f + j] = to_c(da * silu);
    }
}

// Group idx of a row-major [N, F / 8] grid of 8-element groups (f8n = F / 8): its row t, its
// first column j, and the row's 8 gate and 8 up values there.
__device__ __forceinline__ void gate_up_v8(const SwigluParams& p, int f8n, i64 idx, i64& t, int& j, f8& g, f8& u) {
    t = idx / f8n;
    j = (int)(idx - t * f8n) * 8;
    g = ld8(p.gu, t * 2 * p.f + j);
    u = ld8(p.gu, t * 2 * p.f + p.f + j);
}

// The same, 8 elements of a row per thread (f % 8 == 0, 16-byte aligned buffers): one 16-byte
// access per operand, no 64-bit division per element.
extern "C" __global__ void KNAME(swiglu_fwd_v8)(const SwigluParams p) {
    int f8n = p.f / 8;
    i64 total = (i64)p.n * f8n;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t; int j; f8 g, u, a;
        gate_up_v8(p, f8n, idx, t, j, g, u);
#pragma unroll
        for (int k = 0; k < 8; ++k) a.v[k] = g.v[k] * sigmoidf_(g.v[k]) * u.v[k];
        st8(p.out, t * p.f + j, a);
    }
}

extern "C" __global__ void KNAME(swiglu_bwd_v8)(const SwigluParams p) {
    int f8n = p.f / 8;
    i64 total = (i64)p.n * f8n;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t; int j; f8 g, u;
        gate_up_v8(p, f8n, idx, t, j, g, u);
        f8 da = ld8(p.d_a, t * p.f + j), dg, du;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float sg = sigmoidf_(g.v[k]);
            dg.v[k] = da.v[k] * u.v[k] * sg * (1.f + g.v[k] * (1.f - sg));
            du.v[k] = da.v[k] * (g.v[k] * sg);
        }
        st8(p.out, t * 2 * p.f + j, dg);
        st8(p.out, t * 2 * p.f + p.f + j, du);
    }
}
