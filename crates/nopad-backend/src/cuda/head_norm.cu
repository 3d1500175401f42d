// head_norm.cu: RMSNorm of every query and key head of a packed qkv buffer (Qwen3's q_norm and
// k_norm), fp32 statistics.
// qkv (fwd), d_qkv (bwd): [N, (H + 2 Hkv) Dh] compute_t; the first H + Hkv heads of each row are
// normalised in place (queries with weight[0, Dh), keys with weight[Dh, 2 Dh)), the values are
// not touched. x: [N, H + Hkv, Dh] compute_t, the heads' inputs (written by fwd, read by bwd);
// rstd: [N, H + Hkv] f32; weight: [2 Dh] compute_t.
// One warp per (token, head) row, a lane holding columns lane + 32 k (k < HN_MAX_K: Dh <= 256).
// fwd: 8 rows per 256-thread block. bwd: block b owns the tokens [b rows_per, (b + 1) rows_per),
// its warps take the block's rows in turn, each keeping its own weight-gradient sums; the warps'
// sums are added in warp order in shared memory into partial[b, 2 Dh], which reduce.cu's
// partials_finish sums over the blocks: fixed order, no atomics.

#define HN_MAX_K 8
#define HN_WARPS 8

struct HeadNormParams {
    compute_t* qkv;           // fwd: qkv; bwd: d_qkv, dy in, dx out
    compute_t* x;             // fwd: written; bwd: read
    float* rstd;              // fwd: written; bwd: read
    const compute_t* weight;
    float* partial;           // bwd: [gridDim.x, 2 Dh] f32, or null for frozen weights
    int n;
    int heads;
    int kv_heads;
    int head_dim;
    float eps;
    int rows_per;             // bwd: tokens per block
};

extern "C" __global__ void KNAME(head_rmsnorm_fwd)(const HeadNormParams p) {
    const int hn = p.heads + p.kv_heads, dh = p.head_dim, lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * HN_WARPS + (threadIdx.x >> 5);
    if (row >= (i64)p.n * hn) return;  // the whole warp: no shuffle is left waiting
    const int t = (int)(row / hn), h = (int)(row % hn);
    compute_t* y = p.qkv + (i64)t * (hn + p.kv_heads) * dh + (i64)h * dh;
    compute_t* xs = p.x + row * dh;
    const compute_t* w = p.weight + (h < p.heads ? 0 : dh);
    float v[HN_MAX_K], ss = 0.f;
#pragma unroll
    for (int k = 0; k < HN_MAX_K; ++k) {
        const int j = lane + 32 * k;
        v[k] = 0.f;
        if (j < dh) {
            xs[j] = y[j];
            v[k] = ld(y, j);
            ss += v[k] * v[k];
        }
    }
    ss = warp_sum(ss);
    const float r = rsqrtf(ss / (float)dh + p.eps);
    if (lane == 0) p.rstd[row] = r;
#pragma unroll
    for (int k = 0; k < HN_MAX_K; ++k) {
        const int j = lane + 32 * k;
        if (j < dh) y[j] = to_c(v[k] * r * ld(w, j));
    }
}

// dx = r w dy - x r^3 (sum_j w_j dy_j x_j) / Dh, over dy in place; the weight-gradient partial
// of the block: sum over its rows of dy x r, query heads in [0, Dh), key heads in [Dh, 2 Dh).
extern "C" __global__ void KNAME(head_rmsnorm_bwd)(const HeadNormParams p) {
    __shared__ float sums[HN_WARPS][2 * 32 * HN_MAX_K];
    const int hn = p.heads + p.kv_heads, dh = p.head_dim;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t0 = blockIdx.x * p.rows_per, t1 = min(p.n, t0 + p.rows_per);
    const i64 stride = (i64)(hn + p.kv_heads) * dh;
    float wq[HN_MAX_K], wk[HN_MAX_K], aq[HN_MAX_K], ak[HN_MAX_K];
#pragma unroll
    for (int k = 0; k < HN_MAX_K; ++k) {
        const int j = lane + 32 * k;
        wq[k] = j < dh ? ld(p.weight, j) : 0.f;
        wk[k] = j < dh ? ld(p.weight, dh + j) : 0.f;
        aq[k] = 0.f;
        ak[k] = 0.f;
    }
    const int rows = max(0, t1 - t0) * hn;
    for (int i = warp; i < rows; i += HN_WARPS) {
        const int t = t0 + i / hn, h = i % hn;
        const bool is_q = h < p.heads;
        const i64 row = (i64)t * hn + h;
        compute_t* g = p.qkv + (i64)t * stride + (i64)h * dh;
        const compute_t* xs = p.x + row * dh;
        const float r = p.rstd[row];
        float dy[HN_MAX_K], xv[HN_MAX_K], s = 0.f;
#pragma unroll
        for (int k = 0; k < HN_MAX_K; ++k) {
            const int j = lane + 32 * k;
            dy[k] = j < dh ? ld(g, j) : 0.f;
            xv[k] = j < dh ? ld(xs, j) : 0.f;
            s += (is_q ? wq[k] : wk[k]) * dy[k] * xv[k];
        }
        s = warp_sum(s);
        const float c = r * r * r * s / (float)dh;
#pragma unroll
        for (int k = 0; k < HN_MAX_K; ++k) {
            const int j = lane + 32 * k;
            if (j < dh) g[j] = to_c(r * (is_q ? wq[k] : wk[k]) * dy[k] - xv[k] * c);
            if (is_q) aq[k] += dy[k] * xv[k] * r;
            else ak[k] += dy[k] * xv[k] * r;
        }
    }
    if (p.partial == nullptr) return;  // uniform over the block
#pragma unroll
    for (int k = 0; k < HN_MAX_K; ++k) {
        const int j = lane + 32 * k;
        if (j < dh) {
            sums[warp][j] = aq[k];
            sums[warp][dh + j] = ak[k];
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < 2 * dh; c += blockDim.x) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < HN_WARPS; ++w) a += sums[w][c];
        p.partial[(i64)blockIdx.x * 2 * dh + c] = a;
    }
}
