// rmsnorm.cu: RMSNorm forward and backward, fp32 statistics.
// x, y, dy, dx: [N, D] compute_t; weight: [D] compute_t; rstd: [N] f32 (saved by the forward);
// d_weight partials: [splits, D] f32, finished by reduce.cu's partials_finish.
// fwd and bwd_dx: one block (256 threads) per row. bwd_dw_partial: grid (ceil(D/256), splits).
// bwd_fused_v8_1 (D <= 2048, 8-wide): dx and the d_weight partials in one pass, grid splits.

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

// The end of an 8-wide forward row (block blockIdx.x, row start base): the block's sum of
// squares ss gives rstd (stored by thread 0), then y = x * rstd * weight.
__device__ __forceinline__ void rmsnorm_row_v8_finish(const RmsnormParams& p, const compute_t* x, i64 base, float ss, float* scratch) {
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)p.d + p.eps);
    if (threadIdx.x == 0) p.rstd[blockIdx.x] = r;
    for (int j = threadIdx.x * 8; j < p.d; j += blockDim.x * 8) {
        f8 a = ld8(x, base + j), w = ld8(p.weight, j);
#pragma unroll
        for (int k = 0; k < 8; ++k) a.v[k] = a.v[k] * r * w.v[k];
        st8(p.y, base + j, a);
    }
}

// The same forward and dx backward with 8 elements per access (d % 8 == 0, 16-byte aligned rows).
extern "C" __global__ void KNAME(rmsnorm_fwd_v8)(const RmsnormParams p) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * p.d;
    float ss = 0.f;
    for (int j = threadIdx.x * 8; j < p.d; j += blockDim.x * 8) {
        f8 x = ld8(p.x, base + j);
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += x.v[k] * x.v[k];
    }
    rmsnorm_row_v8_finish(p, p.x, base, ss, scratch);
}

extern "C" __global__ void KNAME(rmsnorm_bwd_dx_v8)(const RmsnormParams p) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * p.d;
    float r = p.rstd[blockIdx.x];
    float s = 0.f;
    for (int j = threadIdx.x * 8; j < p.d; j += blockDim.x * 8) {
        f8 w = ld8(p.weight, j), dy = ld8(p.dy, base + j), x = ld8(p.x, base + j);
#pragma unroll
        for (int k = 0; k < 8; ++k) s += w.v[k] * dy.v[k] * x.v[k];
    }
    s = block_sum(s, scratch);
    float c = r * r * r * s / (float)p.d;
    for (int j = threadIdx.x * 8; j < p.d; j += blockDim.x * 8) {
        f8 w = ld8(p.weight, j), dy = ld8(p.dy, base + j), x = ld8(p.x, base + j);
        f8 dx = ld8(p.y, base + j);
#pragma unroll
        for (int k = 0; k < 8; ++k) dx.v[k] = dx.v[k] + (r * w.v[k] * dy.v[k] - x.v[k] * c);
        st8(p.y, base + j, dx);
    }
}

// d_weight partials, 8 columns per thread: partial[s, j..j+8].
extern "C" __global__ void KNAME(rmsnorm_bwd_dw_partial_v8)(const RmsnormParams p) {
    int j = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j >= p.d) return;
    int r0 = blockIdx.y * p.rows_per;
    int r1 = min(p.n, r0 + p.rows_per);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int t = r0; t < r1; ++t) {
        i64 i = (i64)t * p.d + j;
        f8 dy = ld8(p.dy, i), x = ld8(p.x, i);
        float r = p.rstd[t];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] += dy.v[k] * x.v[k] * r;
    }
    float* out = p.partial + (i64)blockIdx.y * p.d + j;
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = acc[k];
}

// The backward in one pass (8-wide, d % 8 == 0, d <= 2048 * NV): block b owns rows
// [b rows_per, (b + 1) rows_per) and, in every thread, columns j = 8 tid + 2048 k (k < NV). Per
// row: s = sum_j w dy x (block sum), dx += r w dy - x r^3 s / D, and the thread's d_weight
// partial += dy x r stays in registers; the next row's dy, x and rstd are loaded before this
// row's reduction, so the loads overlap it. partial[b, :] at the end (partials_finish). One read
// of dy and x instead of two, and as many blocks as splits rather than a 2-D grid of columns.
template <int NV>
__device__ __forceinline__ void rmsnorm_bwd_fused(const RmsnormParams& p) {
    __shared__ float scratch[32];
    const int r0 = blockIdx.x * p.rows_per, r1 = min(p.n, r0 + p.rows_per);
    f8 w[NV], dy[NV], x[NV], ndy[NV], nx[NV];
    float acc[NV][8];
    bool ok[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        int j = threadIdx.x * 8 + 2048 * k;
        ok[k] = j < p.d;
        if (ok[k]) w[k] = ld8(p.weight, j);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;
    }
    float r = 0.f, nr = 0.f;
    if (r0 < r1) {
        r = p.rstd[r0];
#pragma unroll
        for (int k = 0; k < NV; ++k)
            if (ok[k]) {
                dy[k] = ld8(p.dy, (i64)r0 * p.d + threadIdx.x * 8 + 2048 * k);
                x[k] = ld8(p.x, (i64)r0 * p.d + threadIdx.x * 8 + 2048 * k);
            }
    }
    for (int t = r0; t < r1; ++t) {
        const i64 base = (i64)t * p.d;
        if (t + 1 < r1) {
            nr = p.rstd[t + 1];
#pragma unroll
            for (int k = 0; k < NV; ++k)
                if (ok[k]) {
                    ndy[k] = ld8(p.dy, base + p.d + threadIdx.x * 8 + 2048 * k);
                    nx[k] = ld8(p.x, base + p.d + threadIdx.x * 8 + 2048 * k);
                }
        }
        f8 dx[NV];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < NV; ++k)
            if (ok[k]) {
                dx[k] = ld8(p.y, base + threadIdx.x * 8 + 2048 * k);
#pragma unroll
                for (int e = 0; e < 8; ++e) s += w[k].v[e] * dy[k].v[e] * x[k].v[e];
            }
        s = block_sum(s, scratch);
        const float c = r * r * r * s / (float)p.d;
#pragma unroll
        for (int k = 0; k < NV; ++k)
            if (ok[k]) {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    dx[k].v[e] = dx[k].v[e] + (r * w[k].v[e] * dy[k].v[e] - x[k].v[e] * c);
                    acc[k][e] += dy[k].v[e] * x[k].v[e] * r;
                }
                st8(p.y, base + threadIdx.x * 8 + 2048 * k, dx[k]);
                dy[k] = ndy[k];
                x[k] = nx[k];
            }
        r = nr;
    }
#pragma unroll
    for (int k = 0; k < NV; ++k)
        if (ok[k]) {
            float* out = p.partial + (i64)blockIdx.x * p.d + threadIdx.x * 8 + 2048 * k;
#pragma unroll
            for (int e = 0; e < 8; ++e) out[e] = acc[k][e];
        }
}
extern "C" __global__ void KNAME(rmsnorm_bwd_fused_v8_1)(const RmsnormParams p) {
    rmsnorm_bwd_fused<1>(p);
}
// NV = 2 (D up to 4096) measured slower than the two-kernel path on the 7B shape (run 16: 2.35
// against 1.49 ms per step), so only NV = 1 is instantiated.

// x += r (rounded to compute_t, as the separate add kernel does), then the forward above on the
// sum: one read of x and r, one write of x and y. `dy` carries r. 8-wide, d % 8 == 0.
extern "C" __global__ void KNAME(add_rmsnorm_fwd_v8)(const RmsnormParams p) {
    __shared__ float scratch[32];
    i64 base = (i64)blockIdx.x * p.d;
    compute_t* x = (compute_t*)p.x;
    float ss = 0.f;
    for (int j = threadIdx.x * 8; j < p.d; j += blockDim.x * 8) {
        f8 a = ld8(x, base + j), r = ld8(p.dy, base + j);
#pragma unroll
        for (int k = 0; k < 8; ++k) a.v[k] = round_c(a.v[k] + r.v[k]);
        st8(x, base + j, a);
#pragma unroll
        for (int k = 0; k < 8; ++k) ss += a.v[k] * a.v[k];
    }
    rmsnorm_row_v8_finish(p, x, base, ss, scratch);
}
