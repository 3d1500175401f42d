// simple.cu: stage-1 varlen causal attention, forward and backward, scalar fp32 (the GPU oracle).
//
// Computes, per sequence b (rows cu[b]..cu[b+1], length L) and query head h (kv head h / G):
//   out[t, h, :] = softmax_causal(scale * q k^T) v,  lse[h, t] = ln sum_j exp(scale * q_t . k_j)
// and the backward d_qkv from d_out with D = rowsum(d_out * out).
// Shapes: qkv [N, (H + 2 Hkv) * DH] bf16 (q heads, then k heads, then v heads per row);
//         out, d_out [N, H * DH] bf16; lse [H, N] fp32; D [H, N] fp32 (scratch);
//         d_qkv [N, (H + 2 Hkv) * DH] bf16; tiles int4 {seq_start, L, tile, pad_start}, 64 rows.
// Geometry: 1-D grid of tiles x heads (heads fastest), 64 threads, one thread per query row
// (forward, dQ) or key row (dK/dV); the plan's unpacked per-sequence list. Accumulation: fp32
// throughout; no shared memory, no tensor cores. Slow but obvious.

#define SIMPLE_ROWS 64

template <int DH>
__device__ void simple_fwd(const bf16_t* qkv, bf16_t* out, float* lse, const int4* tiles, int H,
                           int Hkv, int N, float scale) {
    int h = blockIdx.x % H;
    int4 tile = tiles[blockIdx.x / H];
    int i = tile.z * SIMPLE_ROWS + threadIdx.x;
    if (i >= tile.y) return;
    int hk = h / (H / Hkv);
    long long rs = (long long)(H + 2 * Hkv) * DH;
    const bf16_t* q = qkv + (long long)(tile.x + i) * rs + h * DH;
    const bf16_t* k0 = qkv + (long long)tile.x * rs + (H + hk) * DH;
    const bf16_t* v0 = qkv + (long long)tile.x * rs + (H + Hkv + hk) * DH;
    float qr[DH], o[DH];
    for (int e = 0; e < DH; ++e) { qr[e] = bf2f(q[e]); o[e] = 0.f; }
    float m = -FLASH_INF, l = 0.f;
    for (int j = 0; j <= i; ++j) {
        const bf16_t* k = k0 + (long long)j * rs;
        const bf16_t* v = v0 + (long long)j * rs;
        float s = 0.f;
        for (int e = 0; e < DH; ++e) s += qr[e] * bf2f(k[e]);
        s *= scale;
        float mn = fmaxf(m, s);
        float a = expf(m - mn), p = expf(s - mn);
        l = l * a + p;
        for (int e = 0; e < DH; ++e) o[e] = o[e] * a + p * bf2f(v[e]);
        m = mn;
    }
    bf16_t* op = out + (long long)(tile.x + i) * H * DH + h * DH;
    for (int e = 0; e < DH; ++e) op[e] = f2bf(o[e] / l);
    lse[(long long)h * N + tile.x + i] = m + logf(l);
}

// D[h, t] = sum_e d_out[t, h, e] * out[t, h, e]  (unpadded [H, N] here).
template <int DH>
__device__ void simple_bwd_prep(const bf16_t* out, const bf16_t* d_out, float* D,
                                const int4* tiles, int H, int N) {
    int h = blockIdx.x % H;
    int4 tile = tiles[blockIdx.x / H];
    int i = tile.z * SIMPLE_ROWS + threadIdx.x;
    if (i >= tile.y) return;
    long long off = (long long)(tile.x + i) * H * DH + h * DH;
    float s = 0.f;
    for (int e = 0; e < DH; ++e) s += bf2f(out[off + e]) * bf2f(d_out[off + e]);
    D[(long long)h * N + tile.x + i] = s;
}

// One thread per query row: dq_i = scale * sum_j p_ij (dp_ij - D_i) k_j.
template <int DH>
__device__ void simple_bwd_dq(const bf16_t* qkv, const bf16_t* d_out, const float* lse,
                              const float* D, bf16_t* d_qkv, const int4* tiles, int H, int Hkv,
                              int N, float scale) {
    int h = blockIdx.x % H;
    int4 tile = tiles[blockIdx.x / H];
    int i = tile.z * SIMPLE_ROWS + threadIdx.x;
    if (i >= tile.y) return;
    int hk = h / (H / Hkv);
    long long rs = (long long)(H + 2 * Hkv) * DH;
    const bf16_t* q = qkv + (long long)(tile.x + i) * rs + h * DH;
    const bf16_t* dout = d_out + (long long)(tile.x + i) * H * DH + h * DH;
    const bf16_t* k0 = qkv + (long long)tile.x * rs + (H + hk) * DH;
    const bf16_t* v0 = qkv + (long long)tile.x * rs + (H + Hkv + hk) * DH;
    float lse_i = lse[(long long)h * N + tile.x + i], d_i = D[(long long)h * N + tile.x + i];
    float dq[DH];
    for (int e = 0; e < DH; ++e) dq[e] = 0.f;
    for (int j = 0; j <= i; ++j) {
        const bf16_t* k = k0 + (long long)j * rs;
        const bf16_t* v = v0 + (long long)j * rs;
        float s = 0.f, dp = 0.f;
        for (int e = 0; e < DH; ++e) {
            s += bf2f(q[e]) * bf2f(k[e]);
            dp += bf2f(dout[e]) * bf2f(v[e]);
        }
        float ds = expf(s * scale - lse_i) * (dp - d_i);
        for (int e = 0; e < DH; ++e) dq[e] += ds * bf2f(k[e]);
    }
    bf16_t* dst = d_qkv + (long long)(tile.x + i) * rs + h * DH;
    for (int e = 0; e < DH; ++e) dst[e] = f2bf(dq[e] * scale);
}

// One thread per key row j of kv head hk, summing the G query heads of its group.
template <int DH>
__device__ void simple_bwd_dkdv(const bf16_t* qkv, const bf16_t* d_out, const float* lse,
                                const float* D, bf16_t* d_qkv, const int4* tiles, int H, int Hkv,
                                int N, float scale) {
    int hk = blockIdx.x % Hkv;
    int4 tile = tiles[blockIdx.x / Hkv];
    int j = tile.z * SIMPLE_ROWS + threadIdx.x;
    if (j >= tile.y) return;
    int G = H / Hkv;
    long long rs = (long long)(H + 2 * Hkv) * DH;
    const bf16_t* k = qkv + (long long)(tile.x + j) * rs + (H + hk) * DH;
    const bf16_t* v = qkv + (long long)(tile.x + j) * rs + (H + Hkv + hk) * DH;
    float dk[DH], dv[DH];
    for (int e = 0; e < DH; ++e) { dk[e] = 0.f; dv[e] = 0.f; }
    for (int g = 0; g < G; ++g) {
        int h = hk * G + g;
        for (int i = j; i < tile.y; ++i) {
            const bf16_t* q = qkv + (long long)(tile.x + i) * rs + h * DH;
            const bf16_t* dout = d_out + (long long)(tile.x + i) * H * DH + h * DH;
            float s = 0.f, dp = 0.f;
            for (int e = 0; e < DH; ++e) {
                s += bf2f(q[e]) * bf2f(k[e]);
                dp += bf2f(dout[e]) * bf2f(v[e]);
            }
            long long r = (long long)h * N + tile.x + i;
            float p = expf(s * scale - lse[r]);
            float ds = p * (dp - D[r]);
            for (int e = 0; e < DH; ++e) {
                dv[e] += p * bf2f(dout[e]);
                dk[e] += ds * bf2f(q[e]);
            }
        }
    }
    bf16_t* dkp = d_qkv + (long long)(tile.x + j) * rs + (H + hk) * DH;
    bf16_t* dvp = d_qkv + (long long)(tile.x + j) * rs + (H + Hkv + hk) * DH;
    for (int e = 0; e < DH; ++e) {
        dkp[e] = f2bf(dk[e] * scale);
        dvp[e] = f2bf(dv[e]);
    }
}

#define SIMPLE_ENTRY(DH)                                                                        \
    extern "C" __global__ void flash_simple_fwd_##DH(const bf16_t* qkv, bf16_t* out, float* lse, \
                                                     const int4* tiles, int H, int Hkv, int N,   \
                                                     float scale) {                              \
        simple_fwd<DH>(qkv, out, lse, tiles, H, Hkv, N, scale);                                  \
    }                                                                                            \
    extern "C" __global__ void flash_simple_bwd_prep_##DH(const bf16_t* out, const bf16_t* d_out, \
                                                          float* D, const int4* tiles, int H,    \
                                                          int N) {                               \
        simple_bwd_prep<DH>(out, d_out, D, tiles, H, N);                                         \
    }                                                                                            \
    extern "C" __global__ void flash_simple_bwd_dq_##DH(                                         \
        const bf16_t* qkv, const bf16_t* d_out, const float* lse, const float* D,                \
        bf16_t* d_qkv, const int4* tiles, int H, int Hkv, int N, float scale) {                  \
        simple_bwd_dq<DH>(qkv, d_out, lse, D, d_qkv, tiles, H, Hkv, N, scale);                   \
    }                                                                                            \
    extern "C" __global__ void flash_simple_bwd_dkdv_##DH(                                       \
        const bf16_t* qkv, const bf16_t* d_out, const float* lse, const float* D,                \
        bf16_t* d_qkv, const int4* tiles, int H, int Hkv, int N, float scale) {                  \
        simple_bwd_dkdv<DH>(qkv, d_out, lse, D, d_qkv, tiles, H, Hkv, N, scale);                 \
    }

SIMPLE_ENTRY(64)
SIMPLE_ENTRY(128)
