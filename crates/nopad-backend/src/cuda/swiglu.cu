// swiglu.cu: a = silu(gate) * up and its backward.
// gu: [N, 2F] compute_t (gate then up per row); a, d_a: [N, F]; d_gu: [N, 2F] (overwritten).
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
