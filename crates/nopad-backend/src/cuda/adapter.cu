// adapter.cu: the ops a low-rank adapter adds: its output scattered into columns of a fused
// projection (add_columns), its gradient gathered from them (gather_columns), and seeded
// dropout whose mask is a hash of (seed, index), mirroring src/dropout.rs bit for bit.
// Flat grids (grid-stride) over N*w or n elements; fp32 arithmetic.

struct ColumnsParams {
    compute_t* dst;        // add: y [N, stride]; gather: y [N, w]
    const compute_t* src;  // add: x [N, w];      gather: x [N, stride]
    i64 n;
    i64 stride;
    i64 c0;
    i64 w;
    float s;
};

// y[t, c0 + j] += s * x[t, j]
extern "C" __global__ void KNAME(add_columns)(const ColumnsParams p) {
    i64 total = p.n * p.w;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t = idx / p.w, j = idx % p.w;
        i64 o = t * p.stride + p.c0 + j;
        p.dst[o] = to_c(ld(p.dst, o) + p.s * ld(p.src, idx));
    }
}

// y[t, j] = s * x[t, c0 + j]
extern "C" __global__ void KNAME(gather_columns)(const ColumnsParams p) {
    i64 total = p.n * p.w;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        i64 t = idx / p.w, j = idx % p.w;
        p.dst[idx] = to_c(p.s * ld(p.src, t * p.stride + p.c0 + j));
    }
}

struct DropoutParams {
    compute_t* y;
    const compute_t* x;
    i64 n;
    unsigned long long seed;
    unsigned threshold;  // drop below this, on a 24-bit scale
    float keep_scale;    // 1 / (1 - p)
    int accumulate;
};

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// y[i] (+)= keep(seed, i) ? x[i] / (1 - p) : 0
extern "C" __global__ void KNAME(dropout)(const DropoutParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        unsigned long long h = mix64(p.seed + ((unsigned long long)i + 1ull) * 0x9e3779b97f4a7c15ull);
        float m = ((unsigned)(h >> 40)) >= p.threshold ? ld(p.x, i) * p.keep_scale : 0.f;
        p.y[i] = to_c(p.accumulate ? ld(p.y, i) + m : m);
    }
}
