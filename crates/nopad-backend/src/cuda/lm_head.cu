// lm_head.cu: the row plumbing and the fused softmax / cross-entropy / dlogits of the chunked
// output head (the GEMMs are cuBLASLt).
// - gather_rows: xc[i, :] = x[rows[i], :]; x [N, D], xc [M, D] compute_t; grid (M), block 256.
// - scatter_rows: dx[rows[i], :] = dxc[i, :]; grid (M), block 256.
// - cross_entropy: one block (256 threads) per chunk row i: logits [C, V] f32, target[i] in
//   [0, V); loss[i] = logsumexp(logits[i]) - logits[i, target]; when dlogits is non-null,
//   dlogits[i, v] = grad_scale * (softmax(logits[i])[v] - [v == target]) (compute_t).

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
    const float* logits;
    compute_t* dlogits;
    float* loss;
    const int* targets;
    int v;
    float grad_scale;
};

extern "C" __global__ void KNAME(cross_entropy)(const CrossEntropyParams p) {
    __shared__ float scratch[32];
    int i = blockIdx.x;
    const float* row = p.logits + (i64)i * p.v;
    float mx = -INF_F;
    for (int j = threadIdx.x; j < p.v; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, scratch);
    float s = 0.f;
    for (int j = threadIdx.x; j < p.v; j += blockDim.x) s += expf(row[j] - mx);
    s = block_sum(s, scratch);
    float lse = mx + logf(s);
    int tgt = p.targets[i];
    if (threadIdx.x == 0) p.loss[i] = lse - row[tgt];
    if (p.dlogits) {
        compute_t* drow = p.dlogits + (i64)i * p.v;
        for (int j = threadIdx.x; j < p.v; j += blockDim.x) {
            float pr = expf(row[j] - lse);
            drow[j] = to_c(p.grad_scale * (pr - (j == tgt ? 1.f : 0.f)));
        }
    }
}
