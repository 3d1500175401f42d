// embedding.cu: token embedding lookup and its gradient.
// x: [N, D] compute_t, table: [V, D] compute_t, tokens: [N] i32 (checked on the host).
// Forward: grid (N), block 256 over D.
// Backward, deterministic: the host sorts the positions by token (`order`, stable) and lists the
// distinct tokens (`uniq`) with their runs in `order` (`seg`, U + 1 offsets). Grid (U, D/256):
// one thread per (token, column) sums the token's rows in fp32 in a fixed order and adds the sum
// to d_table once: [V, D] f32 (embedding_bwd_sorted) or bf16 (embedding_bwd_sorted_g16, with
// bf16 gradients; one rounding per step for each touched element).

struct EmbeddingParams {
    compute_t* x;          // forward output / backward input (read-only there)
    const compute_t* table;
    void* d_table;         // float* or bf16_t* (backward)
    const int* tokens;     // forward: [N]; backward: order [N], then uniq [U], then seg [U + 1]
    int n;
    int d;
    int n_uniq;
};

extern "C" __global__ void KNAME(embedding_fwd)(const EmbeddingParams p) {
    int t = blockIdx.x;
    i64 row = (i64)p.tokens[t] * p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) p.x[(i64)t * p.d + j] = p.table[row + j];
}

__device__ __forceinline__ float embedding_row_sum(const EmbeddingParams& p, int u, int j) {
    const int* order = p.tokens;
    const int* seg = p.tokens + p.n + p.n_uniq;
    int k = seg[u], end = seg[u + 1];
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    for (; k + 3 < end; k += 4) {
        a0 += ld(p.x, (i64)order[k] * p.d + j);
        a1 += ld(p.x, (i64)order[k + 1] * p.d + j);
        a2 += ld(p.x, (i64)order[k + 2] * p.d + j);
        a3 += ld(p.x, (i64)order[k + 3] * p.d + j);
    }
    for (; k < end; ++k) a0 += ld(p.x, (i64)order[k] * p.d + j);
    return (a0 + a1) + (a2 + a3);
}

extern "C" __global__ void KNAME(embedding_bwd_sorted)(const EmbeddingParams p) {
    int u = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= p.d) return;
    i64 at = (i64)p.tokens[p.n + u] * p.d + j;
    float* dt = (float*)p.d_table;
    dt[at] += embedding_row_sum(p, u, j);
}

extern "C" __global__ void KNAME(embedding_bwd_sorted_g16)(const EmbeddingParams p) {
    int u = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= p.d) return;
    i64 at = (i64)p.tokens[p.n + u] * p.d + j;
    bf16_t* dt = (bf16_t*)p.d_table;
    dt[at] = f32_to_bf16(bf16_to_f32(dt[at]) + embedding_row_sum(p, u, j));
}
