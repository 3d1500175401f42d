// embedding.cu: token embedding lookup and its gradient.
// x: [N, D] compute_t, table: [V, D] compute_t, tokens: [N] i32 (checked on the host),
// d_table: [V, D] f32 (Master). Grid (N), block 256 over D.
// The backward accumulates with fp32 atomics: repeated tokens add in nondeterministic order
// (within fp32 rounding).

struct EmbeddingParams {
    compute_t* x;          // forward output / backward input (read-only there)
    const compute_t* table;
    float* d_table;
    const int* tokens;
    int n;
    int d;
};

extern "C" __global__ void KNAME(embedding_fwd)(const EmbeddingParams p) {
    int t = blockIdx.x;
    i64 row = (i64)p.tokens[t] * p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) p.x[(i64)t * p.d + j] = p.table[row + j];
}

extern "C" __global__ void KNAME(embedding_bwd)(const EmbeddingParams p) {
    int t = blockIdx.x;
    i64 row = (i64)p.tokens[t] * p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x)
        atomicAdd(&p.d_table[row + j], ld(p.x, (i64)t * p.d + j));
}
