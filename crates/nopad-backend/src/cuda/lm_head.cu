// lm_head.cu: the row plumbing and the fused softmax / cross-entropy / dlogits of the chunked
// output head (the GEMMs are cuBLASLt).
// - gather_rows: xc[i, :] = x[rows[i], :]; x [N, D], xc [M, D] compute_t; grid (M), block 256.
// - scatter_rows: dx[rows[i], :] = dxc[i, :]; grid (M), block 256.
// - cross_entropy: one block (256 threads) per chunk row i: logits [C, V] f32, target[i] in
//   [0, V); loss[i] = logsumexp(logits[i]) - logits[i, target] (one pass: running max and sum);
//   with `grad`, dlogits[i, v] = grad_scale * (softmax(logits[i])[v] - [v == target]) as
//   compute_t *in place*: row i's dlogits start where its logits do, so the compute_t matrix has
//   rows V * 4 / sizeof(compute_t) elements apart. A block rewrites only its own row, in tiles
//   of 1024 whose writes reach only f32 elements read by earlier tiles (bf16 element j lies in
//   f32 element j / 2), with a barrier between each tile's reads and writes.

struct RowsParams {
    compute_t* dst;
    const compute_t* src;
    const int* rows;
    int d;
};

extern "C" __global__ void KNAME(gather_rows)(const RowsParams p) {
    i64 from = (i64)p.rows[blockIdx.x] * p.d, to = (i64)blockIdx.x * p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) p.dst[to + j] = p.src[from + j];
}

extern "C" __global__ void KNAME(scatter_rows)(const RowsParams p) {
    i64 from = (i64)blockIdx.x * p.d, to = (i64)p.rows[blockIdx.x] * p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) p.dst[to + j] = p.src[from + j];
}

struct CrossEntropyParams {
    float* logits;
    float* loss;
    const int* targets;
    int v;
    int grad;
    float grad_scale;
};

extern "C" __global__ void KNAME(cross_entropy)(const CrossEntropyParams p) {
    __shared__ float scratch[32];
    int i = blockIdx.x;
    float* row = p.logits + (i64)i * p.v;
    // Online logsumexp: each thread keeps a running max and the sum of exp relative to it.
    float mx = -INF_F, s = 0.f;
    for (int j = threadIdx.x; j < p.v; j += blockDim.x) {
        float x = row[j];
        if (x > mx) {
            s = s * expf(mx - x) + 1.f;
            mx = x;
        } else {
            s += expf(x - mx);
        }
    }
    float m = block_max(mx, scratch);
    s = block_sum(mx == -INF_F ? 0.f : s * expf(mx - m), scratch);
    float lse = m + logf(s);
    int tgt = p.targets[i];
    float lt = row[tgt];
    if (threadIdx.x == 0) p.loss[i] = lse - lt;
    if (!p.grad) return;
    __syncthreads();  // every thread has read row[tgt] before any write
    compute_t* drow = (compute_t*)row;
    for (int t0 = 0; t0 < p.v; t0 += 4 * blockDim.x) {
        float x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int j = t0 + k * blockDim.x + threadIdx.x;
            x[k] = j < p.v ? row[j] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int j = t0 + k * blockDim.x + threadIdx.x;
            if (j < p.v) drow[j] = to_c(p.grad_scale * (expf(x[k] - lse) - (j == tgt ? 1.f : 0.f)));
        }
    }
}
