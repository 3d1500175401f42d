// rope.cu: rotary embedding in place, HF rotate-half convention, per-token positions.
// x: rows of `row_stride` compute_t, the first n_rot_heads heads of Dh rotated; inv_freq: [Dh/2]
// f32; positions: [N] i32. Angle = (float)pos * inv_freq[i] in fp32 (as HF), sign = +1 forward,
// -1 backward (the inverse rotation). Flat grid over N * n_rot_heads * Dh/2.

struct RopeParams {
    compute_t* x;
    const float* inv_freq;
    const int* positions;
    int n;
    int row_stride;
    int n_rot_heads;
    int head_dim;
    float sign;
};

extern "C" __global__ void KNAME(rope)(const RopeParams p) {
    int half = p.head_dim / 2;
    i64 total = (i64)p.n * p.n_rot_heads * half;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        i64 th = idx / half;
        int h = (int)(th % p.n_rot_heads);
        int t = (int)(th / p.n_rot_heads);
        float ang = (float)p.positions[t] * p.inv_freq[i];
        float c = cosf(ang), s = p.sign * sinf(ang);
        i64 base = (i64)t * p.row_stride + (i64)h * p.head_dim;
        float x1 = ld(p.x, base + i), x2 = ld(p.x, base + i + half);
        p.x[base + i] = to_c(x1 * c - x2 * s);
        p.x[base + i + half] = to_c(x2 * c + x1 * s);
    }
}

// The same, 8 rotation pairs per thread (Dh/2 % 8 == 0, row_stride % 8 == 0, 16-byte aligned x).
extern "C" __global__ void KNAME(rope_v8)(const RopeParams p) {
    int half = p.head_dim / 2, h8 = half / 8;
    i64 total = (i64)p.n * p.n_rot_heads * h8;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        int i = (int)(idx % h8) * 8;
        i64 th = idx / h8;
        int h = (int)(th % p.n_rot_heads);
        int t = (int)(th / p.n_rot_heads);
        float pos = (float)p.positions[t];
        i64 base = (i64)t * p.row_stride + (i64)h * p.head_dim;
        f8 x1 = ld8(p.x, base + i), x2 = ld8(p.x, base + i + half), y1, y2;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float ang = pos * p.inv_freq[i + k];
            float c = cosf(ang), s = p.sign * sinf(ang);
            y1.v[k] = x1.v[k] * c - x2.v[k] * s;
            y2.v[k] = x2.v[k] * c + x1.v[k] * s;
        }
        st8(p.x, base + i, y1);
        st8(p.x, base + i + half, y2);
    }
}
