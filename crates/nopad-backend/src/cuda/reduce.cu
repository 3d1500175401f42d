// reduce.cu: deterministic reductions (fixed order, no atomics).
// - sum_squares: x [n] compute_t -> partial [gridDim.x] f64 (host adds the partials in f64).
// - colsum_partial: dy [rows, cols] compute_t -> partial [splits, cols] f32, split s summing
//   rows s*rows_per..; grid (ceil(cols/256), splits), block 256.
// - partials_finish: out[c] (+)= sum_s partial[s, c] (accumulate != 0: +=, else =); out
//   [cols] of the gradient type; grid ceil(cols/32).
// - sum_into: out[0] += sum_i x[i]; x [n] f32; one block of 1024 threads.

struct SumSquaresParams {
    const compute_t* x;
    double* partial;
    i64 n;
};

extern "C" __global__ void KNAME(sum_squares)(const SumSquaresParams p) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        double v = (double)ld(p.x, i);
        acc += v * v;
    }
    acc = warp_sum_d(acc);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double t = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) p.partial[blockIdx.x] = t;
    }
}

struct ColsumParams {
    const compute_t* dy;
    float* partial;
    int rows;
    int cols;
    int rows_per;
};

extern "C" __global__ void KNAME(colsum_partial)(const ColsumParams p) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.cols) return;
    int r0 = blockIdx.y * p.rows_per;
    int r1 = min(p.rows, r0 + p.rows_per);
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += ld(p.dy, (i64)r * p.cols + c);
    p.partial[(i64)blockIdx.y * p.cols + c] = acc;
}

struct FinishParams {
    compute_t* out;   // launched for the gradient type (the f32 or the bf16 build)
    const float* partial;
    int splits;
    int cols;
    int accumulate;
};

// Blocks of 256 threads = 32 columns x 8 groups of splits, each group summing every 8th split
// with 4 loads in flight, then a fixed-order sum of the 8 groups in shared memory
// (deterministic). Grid: ceil(cols / 32).
extern "C" __global__ void KNAME(partials_finish)(const FinishParams p) {
    __shared__ float part[8][33];
    int x = threadIdx.x & 31, y = threadIdx.x >> 5;
    int c = blockIdx.x * 32 + x;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    if (c < p.cols) {
        int s = y;
        for (; s + 24 < p.splits; s += 32) {
            a0 += p.partial[(i64)s * p.cols + c];
            a1 += p.partial[(i64)(s + 8) * p.cols + c];
            a2 += p.partial[(i64)(s + 16) * p.cols + c];
            a3 += p.partial[(i64)(s + 24) * p.cols + c];
        }
        for (; s < p.splits; s += 8) a0 += p.partial[(i64)s * p.cols + c];
    }
    part[y][x] = (a0 + a1) + (a2 + a3);
    __syncthreads();
    if (y == 0 && c < p.cols) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) acc += part[k][x];
        p.out[c] = to_c(p.accumulate ? ld(p.out, c) + acc : acc);
    }
}

struct SumIntoParams {
    float* out;
    const float* x;
    int n;
};

extern "C" __global__ void KNAME(sum_into)(const SumIntoParams p) {
    __shared__ float scratch[32];
    float acc = 0.f;
    for (int i = threadIdx.x; i < p.n; i += blockDim.x) acc += p.x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) p.out[0] += acc;
}
