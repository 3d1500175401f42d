// attention_bwd.cu: varlen causal GQA attention backward, simple and exact; the exact path for F32 mode and head dims nopad-flash does not take.
//
// Shapes as attention_fwd.cu; d_qkv (AttnParams.out): [N, (H + 2*Hkv)*Dh] compute_t, every element
// of the first N rows written once; d_out, o: [N, H*Dh]; lse, delta: [H, N] f32.
// Three kernels, no atomics (deterministic):
// - attention_bwd_delta: delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]; one warp per (t, h).
// - attention_bwd_dkv: grid (T key tiles, Hkv); thread (c = tid/4, q4) owns key row c and dims
//   q4 + 4k of dK and dV; loops over the G query heads of the group and the query tiles at or
//   after the diagonal, recomputing P = exp(scale*QK^T - lse); dV += P^T dO;
//   dS = P * (dO V^T - delta); dK += scale * dS^T Q. GQA sums happen in registers.
// - attention_bwd_dq: grid (T query tiles, H); thread (r, q4) owns query row r;
//   dQ = scale * sum over key tiles of dS K.
// Dynamic shared memory: four [64][Dh+1] f32 tiles, one [64][65] f32 tile, 2 x 64 f32.

extern "C" __global__ void KNAME(attention_bwd_delta)(const AttnParams p) {
    i64 warp = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= (i64)p.n * p.h) return;
    int t = (int)(warp / p.h), h = (int)(warp % p.h);
    i64 base = (i64)t * p.h * p.dh + (i64)h * p.dh;
    float acc = 0.f;
    for (int d = lane; d < p.dh; d += 32) acc += ld(p.d_out, base + d) * ld(p.o, base + d);
    acc = warp_sum(acc);
    if (lane == 0) ((float*)p.delta)[(i64)h * p.n + t] = acc;
}

extern "C" __global__ void KNAME(attention_bwd_dkv)(const AttnParams p) {
    extern __shared__ float smem[];
    const int sld = p.dh + 1;
    float* sK = smem;
    float* sV = sK + BC * sld;
    float* sQ = sV + BC * sld;
    float* sdO = sQ + BR * sld;
    float* sPT = sdO + BR * sld;  // [BC][BR+1]: P^T, then dS^T
    float* sL = sPT + BC * (BR + 1);
    float* sD = sL + BR;

    const int b = p.tiles[2 * blockIdx.x], nt = p.tiles[2 * blockIdx.x + 1];
    const int hk = blockIdx.y, g = p.h / p.hkv;
    const int start = p.cu[b], len = p.cu[b + 1] - start;
    const int k0 = nt * BC;
    const i64 width = (i64)(p.h + 2 * p.hkv) * p.dh;
    const i64 owidth = (i64)p.h * p.dh;
    const int kcol = (p.h + hk) * p.dh, vcol = (p.h + p.hkv + hk) * p.dh;

    load_rows(sK, sld, p.qkv, width, start, k0, len, kcol, p.dh);
    load_rows(sV, sld, p.qkv, width, start, k0, len, vcol, p.dh);

    const int c = threadIdx.x >> 2, q4 = threadIdx.x & 3;
    const int kj = k0 + c;
    float dk[DPT], dv[DPT];
#pragma unroll
    for (int k = 0; k < DPT; ++k) { dk[k] = 0.f; dv[k] = 0.f; }

    for (int hq = hk * g; hq < hk * g + g; ++hq) {
        for (int q0 = (k0 / BR) * BR; q0 < len; q0 += BR) {
            __syncthreads();
            load_rows(sQ, sld, p.qkv, width, start, q0, len, hq * p.dh, p.dh);
            load_rows(sdO, sld, p.d_out, owidth, start, q0, len, hq * p.dh, p.dh);
            for (int r = threadIdx.x; r < BR; r += NT) {
                bool ok = q0 + r < len;
                sL[r] = ok ? p.lse[(i64)hq * p.n + start + q0 + r] : INF_F;
                sD[r] = ok ? p.delta[(i64)hq * p.n + start + q0 + r] : 0.f;
            }
            __syncthreads();

            float pv[BR / 4], ds[BR / 4];
#pragma unroll
            for (int j = 0; j < BR / 4; ++j) {
                int r = q4 + 4 * j, qi = q0 + r;
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < p.dh; ++d) {
                    s += sQ[r * sld + d] * sK[c * sld + d];
                    dp += sdO[r * sld + d] * sV[c * sld + d];
                }
                bool ok = qi < len && kj < len && kj <= qi;
                float pr = ok ? expf(s * p.scale - sL[r]) : 0.f;
                pv[j] = pr;
                ds[j] = pr * (dp - sD[r]);
            }
#pragma unroll
            for (int j = 0; j < BR / 4; ++j) sPT[c * (BR + 1) + q4 + 4 * j] = pv[j];
            __syncwarp();
#pragma unroll
            for (int k = 0; k < DPT; ++k) {
                int d = q4 + 4 * k;
                if (d < p.dh) {
                    float acc = 0.f;
                    for (int r = 0; r < BR; ++r) acc += sPT[c * (BR + 1) + r] * sdO[r * sld + d];
                    dv[k] += acc;
                }
            }
            __syncwarp();
#pragma unroll
            for (int j = 0; j < BR / 4; ++j) sPT[c * (BR + 1) + q4 + 4 * j] = ds[j];
            __syncwarp();
#pragma unroll
            for (int k = 0; k < DPT; ++k) {
                int d = q4 + 4 * k;
                if (d < p.dh) {
                    float acc = 0.f;
                    for (int r = 0; r < BR; ++r) acc += sPT[c * (BR + 1) + r] * sQ[r * sld + d];
                    dk[k] += acc;
                }
            }
            __syncwarp();
        }
    }

    if (kj < len) {
        const i64 row = (i64)(start + kj) * width;
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
            int d = q4 + 4 * k;
            if (d < p.dh) {
                p.out[row + kcol + d] = to_c(dk[k] * p.scale);
                p.out[row + vcol + d] = to_c(dv[k]);
            }
        }
    }
}

extern "C" __global__ void KNAME(attention_bwd_dq)(const AttnParams p) {
    extern __shared__ float smem[];
    const int sld = p.dh + 1;
    float* sQ = smem;
    float* sdO = sQ + BR * sld;
    float* sK = sdO + BR * sld;
    float* sV = sK + BC * sld;
    float* sS = sV + BC * sld;  // [BR][BC+1]: dS

    const int b = p.tiles[2 * blockIdx.x], mt = p.tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hk = h / (p.h / p.hkv);
    const int start = p.cu[b], len = p.cu[b + 1] - start;
    const int q0 = mt * BR;
    const i64 width = (i64)(p.h + 2 * p.hkv) * p.dh;
    const i64 owidth = (i64)p.h * p.dh;
    const int kcol = (p.h + hk) * p.dh, vcol = (p.h + p.hkv + hk) * p.dh;

    load_rows(sQ, sld, p.qkv, width, start, q0, len, h * p.dh, p.dh);
    load_rows(sdO, sld, p.d_out, owidth, start, q0, len, h * p.dh, p.dh);

    const int r = threadIdx.x >> 2, q4 = threadIdx.x & 3;
    const int qi = q0 + r;
    const bool row_ok = qi < len;
    const float lse = row_ok ? p.lse[(i64)h * p.n + start + qi] : INF_F;
    const float dl = row_ok ? p.delta[(i64)h * p.n + start + qi] : 0.f;
    float dq[DPT];
#pragma unroll
    for (int k = 0; k < DPT; ++k) dq[k] = 0.f;

    const int kend = min(q0 + BR, len);
    for (int k0 = 0; k0 < kend; k0 += BC) {
        __syncthreads();
        load_rows(sK, sld, p.qkv, width, start, k0, len, kcol, p.dh);
        load_rows(sV, sld, p.qkv, width, start, k0, len, vcol, p.dh);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < BC / 4; ++j) {
            int c = q4 + 4 * j, kj = k0 + c;
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < p.dh; ++d) {
                s += sQ[r * sld + d] * sK[c * sld + d];
                dp += sdO[r * sld + d] * sV[c * sld + d];
            }
            bool ok = row_ok && kj < len && kj <= qi;
            float pr = ok ? expf(s * p.scale - lse) : 0.f;
            sS[r * (BC + 1) + c] = pr * (dp - dl);
        }
        __syncwarp();
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
            int d = q4 + 4 * k;
            if (d < p.dh) {
                float acc = 0.f;
                for (int c = 0; c < BC; ++c) acc += sS[r * (BC + 1) + c] * sK[c * sld + d];
                dq[k] += acc;
            }
        }
        __syncwarp();
    }

    if (row_ok) {
        const i64 row = (i64)(start + qi) * width;
#pragma unroll
        for (int k = 0; k < DPT; ++k) {
            int d = q4 + 4 * k;
            if (d < p.dh) p.out[row + (i64)h * p.dh + d] = to_c(dq[k] * p.scale);
        }
    }
}
