// adapter.cu: the ops a low-rank adapter adds: its output scattered into columns of a fused
// projection (add_columns), its gradient gathered from them (gather_columns), and seeded
// dropout whose mask is a hash of (seed, index), mirroring src/dropout.rs bit for bit, and the
// dequantisation of an NF4 base weight (dequant_nf4), mirroring src/nf4.rs bit for bit.
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

struct DequantNf4Params {
    float nf4[16];                    // the NF4 values
    float map[256];                   // the signed dynamic map of the scale codes
    i64 n;
    i64 mean_at;
    compute_t* y;                     // [n]
    const unsigned char* codes;       // [ceil(n/2)]: element 2i high nibble, 2i+1 low
    const unsigned char* scale_codes; // [ceil(n/64)]
    const float* absmax;              // [ceil(n/64/256)] absmax, then the mean
};

// y[i] = nf4[code i] * (map[scale code] * absmax[blk / 256] + mean), blk = i / 64; explicit
// roundings (no fma contraction) so the CPU's f32 arithmetic is matched bit for bit. One thread
// per code byte (two elements); the tables are copied to shared memory first, as their indices
// differ from thread to thread.
extern "C" __global__ void KNAME(dequant_nf4)(const DequantNf4Params p) {
    __shared__ float nf4[16], map[256];
    for (int j = threadIdx.x; j < 256; j += blockDim.x) {
        map[j] = p.map[j];
        if (j < 16) nf4[j] = p.nf4[j];
    }
    __syncthreads();
    float mean = p.absmax[p.mean_at];
    i64 bytes = (p.n + 1) / 2;
    for (i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x; k < bytes; k += (i64)gridDim.x * blockDim.x) {
        unsigned byte = p.codes[k];
        i64 i = 2 * k, blk = i / 64;  // both elements share a block (64 is even)
        float scale = __fadd_rn(__fmul_rn(map[p.scale_codes[blk]], p.absmax[blk / 256]), mean);
        p.y[i] = to_c(__fmul_rn(nf4[byte >> 4], scale));
        if (i + 1 < p.n) p.y[i + 1] = to_c(__fmul_rn(nf4[byte & 15u], scale));
    }
}
