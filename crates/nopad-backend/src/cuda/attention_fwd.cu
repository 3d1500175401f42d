// attention_fwd.cu: varlen causal GQA attention forward, simple and exact; the exact path for F32 mode and head dims nopad-flash does not take.
//
// qkv: [N, (H + 2*Hkv)*Dh] compute_t (queries, keys, values per row); out: [N, H*Dh] compute_t;
// lse: [H, N] f32 (natural log of the sum of exp of scaled scores); cu: [S+1] i32;
// tiles: [T, 2] i32 (sequence b, query tile m) built on the host.
// Grid (T, H); block 256 threads; tile 64 queries x 64 keys; Dh <= 128.
// Thread (r = tid/4, q4 = tid%4) owns query row r and head dims q4 + 4k. Scores, online softmax
// and the output accumulate in fp32 from shared memory; the four threads of a row (one quad of
// a warp) combine their row max and sum with shuffles.
// Dynamic shared memory: Q, K, V tiles [64][Dh+1] f32 and P [64][65] f32.

extern "C" __global__ void KNAME(attention_fwd)(const AttnParams p) {
    extern __shared__ float smem[];
    const int sld = p.dh + 1;
    float* sQ = smem;
    float* sK = sQ + BR * sld;
    float* sV = sK + BC * sld;
    float* sP = sV + BC * sld;  // [BR][BC+1]

    const int b = p.tiles[2 * blockIdx.x], mt = p.tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hk = h / (p.h / p.hkv);
    const int start = p.cu[b], len = p.cu[b + 1] - start;
    const int q0 = mt * BR;
    const i64 width = (i64)(p.h + 2 * p.hkv) * p.dh;
    const int qcol = h * p.dh, kcol = (p.h + hk) * p.dh, vcol = (p.h + p.hkv + hk) * p.dh;

    load_rows(sQ, sld, p.qkv, width, start, q0, len, qcol, p.dh);

    const int r = threadIdx.x >> 2, q4 = threadIdx.x & 3;
    const int qi = q0 + r;
    float o[DPT];
#pragma unroll
    for (int k = 0; k < DPT; ++k) o[k] = 0.f;
    float m_i = -INF_F, l_i = 0.f;

    const int kend = min(q0 + BR, len);  // keys [0, kend) are visible to some row of the tile
    for (int k0 = 0; k0 < kend; k0 += BC) {
        __syncthreads();
        load_rows(sK, sld, p.qkv, width, start, k0, len, kcol, p.dh);
        load_rows(sV, sld, p.qkv, width, start, k0, len, vcol, p.dh);
        __syncthreads();

        float s[BC / 4];
        float mx = -INF_F;
#pragma unroll
        for (int j = 0; j < BC / 4; ++j) {
            int c = q4 + 4 * j, kj = k0 + c;
            float acc = 0.f;
            for (int d = 0; d < p.dh; ++d) acc += sQ[r * sld + d] * sK[c * sld + d];
            s[j] = (kj <= qi && kj < len && qi < len) ? acc * p.scale : -INF_F;
            mx = fmaxf(mx, s[j]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float m_new = fmaxf(m_i, mx);
        float base = m_new == -INF_F ? 0.f : m_new;  // fully masked so far: avoid -inf - -inf
        float alpha = expf(m_i - base);
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < BC / 4; ++j) {
            float pj = expf(s[j] - base);
            rs += pj;
            sP[r * (BC + 1) + q4 + 4 * j] = pj;
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        rs += __shfl_xor_sync(0xffffffffu, rs, 2);
        l_i = alpha * l_i + rs;
        m_i = m_new;
        __syncwarp();
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
            int d = q4 + 4 * k;
            if (d < p.dh) {
                float acc = 0.f;
                for (int c = 0; c < BC; ++c) acc += sP[r * (BC + 1) + c] * sV[c * sld + d];
                o[k] = alpha * o[k] + acc;
            }
        }
        __syncwarp();
    }

    if (qi < len) {
        const i64 t = start + qi;
        float inv = l_i > 0.f ? 1.f / l_i : 0.f;
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
            int d = q4 + 4 * k;
            if (d < p.dh) p.out[t * (i64)p.h * p.dh + (i64)h * p.dh + d] = to_c(o[k] * inv);
        }
        if (q4 == 0) p.lse[(i64)h * p.n + t] = l_i > 0.f ? m_i + logf(l_i) : INF_F;
    }
}
