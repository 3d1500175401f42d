// rmsnorm.cu: RMSNorm forward and backward, fp32 statistics.
// x, y, dy, dx: [N, D] compute_t; weight: [D] compute_t; rstd: [N] f32 (saved by the forward);
// d_weight partials: [splits, D] f32, finished by reduce.cu's partials_finish.
// fwd and bwd_dx: one block (256 threads) per row. bwd_dw_partial: grid (ceil(D/256), splits).

struct RmsnormParams {
    compute_t* y;          // fwd: y; bwd: dx (accumulated)
    float* rstd;
    const compute_t* x;
    const compute_t* weight;
    const compute_t* dy;
    float* partial;
    int n;
    int d;
    float eps;
    int rows_per;
};

extern "C" __global__ void KNAME(rmsnorm_fwd)(const RmsnormParams p) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    const compute_t* x = p.x + (i64)t * p.d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) { float v = ld(x, j); ss += v * v; }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)p.d + p.eps);
    if (threadIdx.x == 0) p.rstd[t] = r;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x)
        p.y[(i64)t * p.d + j] = to_c(ld(x, j) * r * ld(p.weight, j));
}

// dx += r*w*dy - x * r^3 * (sum_j w_j dy_j x_j) / D
extern "C" __global__ void KNAME(rmsnorm_bwd_dx)(const RmsnormParams p) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    i64 base = (i64)t * p.d;
    float r = p.rstd[t];
    float s = 0.f;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x)
        s += ld(p.weight, j) * ld(p.dy, base + j) * ld(p.x, base + j);
    s = block_sum(s, scratch);
    float c = r * r * r * s / (float)p.d;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) {
        float g = r * ld(p.weight, j) * ld(p.dy, base + j) - ld(p.x, base + j) * c;
        p.y[base + j] = to_c(ld(p.y, base + j) + g);
    }
}

// partial[s, j] = sum over rows of split s of dy[t, j] * x[t, j] * rstd[t]
extern "C" __global__ void KNAME(rmsnorm_bwd_dw_partial)(const RmsnormParams p) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.d) return;
    int r0 = blockIdx.y * p.rows_per;
    int r1 = min(p.n, r0 + p.rows_per);
    float acc = 0.f;
    for (int t = r0; t < r1; ++t) {
        i64 i = (i64)t * p.d + j;
        acc += ld(p.dy, i) * ld(p.x, i) * p.rstd[t];
    }
    p.partial[(i64)blockIdx.y * p.d + j] = acc;
}
