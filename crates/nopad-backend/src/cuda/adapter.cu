// adapter.cu: the kernels a low-rank adapter adds (its GEMMs are cuBLASLt's, adapter.rs): seeded
// dropout whose mask is a hash of (seed, index), mirroring src/dropout.rs bit for bit, and the
// dequantisation of an NF4 base weight (dequant_nf4), mirroring src/nf4.rs bit for bit.
// Flat grids (grid-stride); fp32 arithmetic.

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
// roundings (no fma contraction) so the CPU's f32 arithmetic is matched bit for bit. The tables
// are copied to shared memory first, as their indices differ from thread to thread.
__device__ __forceinline__ void nf4_tables(const DequantNf4Params& p, float* nf4, float* map) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) {
        map[j] = p.map[j];
        if (j < 16) nf4[j] = p.nf4[j];
    }
    __syncthreads();
}

__device__ __forceinline__ float nf4_scale(const DequantNf4Params& p, const float* map, i64 blk, float mean) {
    return __fadd_rn(__fmul_rn(map[p.scale_codes[blk]], p.absmax[blk / 256]), mean);
}

// Any n and alignment: one thread per code byte (two elements).
extern "C" __global__ void KNAME(dequant_nf4)(const DequantNf4Params p) {
    __shared__ float nf4[16], map[256];
    nf4_tables(p, nf4, map);
    float mean = p.absmax[p.mean_at];
    i64 bytes = (p.n + 1) / 2;
    for (i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x; k < bytes; k += (i64)gridDim.x * blockDim.x) {
        unsigned byte = p.codes[k];
        i64 i = 2 * k, blk = i / 64;  // both elements share a block (64 is even)
        float scale = nf4_scale(p, map, blk, mean);
        p.y[i] = to_c(__fmul_rn(nf4[byte >> 4], scale));
        if (i + 1 < p.n) p.y[i + 1] = to_c(__fmul_rn(nf4[byte & 15u], scale));
    }
}

// n a multiple of 8, y 16-byte and codes 4-byte aligned (the launcher checks): eight elements a
// thread from one 32-bit load of four code bytes, all in one 64-element block, written with
// 16-byte stores. The same arithmetic per element as dequant_nf4; only the memory access is
// wider (one byte read and two 2-byte writes a thread leave most of HBM's bandwidth unused).
extern "C" __global__ void KNAME(dequant_nf4_x8)(const DequantNf4Params p) {
    __shared__ float nf4[16], map[256];
    nf4_tables(p, nf4, map);
    float mean = p.absmax[p.mean_at];
    i64 groups = p.n / 8;
    const unsigned* words = (const unsigned*)p.codes;
    for (i64 g = blockIdx.x * (i64)blockDim.x + threadIdx.x; g < groups; g += (i64)gridDim.x * blockDim.x) {
        unsigned four = words[g];
        i64 i = 8 * g;
        float scale = nf4_scale(p, map, i / 64, mean);
        __align__(16) compute_t v[8];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            unsigned byte = (four >> (8 * b)) & 255u;  // little-endian: code byte 4g + b
            v[2 * b] = to_c(__fmul_rn(nf4[byte >> 4], scale));
            v[2 * b + 1] = to_c(__fmul_rn(nf4[byte & 15u], scale));
        }
        uint4* dst = (uint4*)(p.y + i);
        const uint4* src = (const uint4*)v;
#pragma unroll
        for (int q = 0; q < (int)(sizeof(v) / 16); q++) dst[q] = src[q];
    }
}
