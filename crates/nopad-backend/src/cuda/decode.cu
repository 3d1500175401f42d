// decode.cu: generation's two kernels. copy_rows copies rows (or a run of their columns) to
// chosen rows of another buffer: the KV cache's append of each new token's keys and values, and
// the gather of each prompt's last row. decode_attn_chunk and decode_attn_combine are the
// attention of one query row per sequence over its cached keys and values, split over the keys
// (flash-decoding): each block takes KEYS keys of one sequence and one kv head with every query
// head of its GQA group, so each cached key and value is read from memory once per step; the
// combine kernel merges the chunks' partial results with their maxima and sums.
//
// Shapes: qkv [B, (H + 2*Hkv)*Dh] compute_t (queries in the first H*Dh columns); cache
// [rows, 2*Hkv*Dh] compute_t (a token's keys, then its values); spans [2B] i32 (first row,
// keys); out [B, H*Dh] compute_t; part_o [B, H, C, Dh] f32 and part_ml [B, H, C, 2] f32 (each
// chunk's unnormalised output, its maximum and sum), C = chunks of the longest sequence.

// y [rows, w], x [rows, x_stride], pairs [2n] (source row, destination row).
struct CopyRowsParams { compute_t* y; const compute_t* x; const int* pairs; i64 n, x_stride, c0, w; };

// y[pairs[2t+1], j] = x[pairs[2t], c0 + j]: a grid-stride loop over the n*w elements, a row's
// w consecutive threads reading and writing consecutive addresses.
extern "C" __global__ void KNAME(copy_rows)(const CopyRowsParams p) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < p.n * p.w; idx += stride) {
        const i64 t = idx / p.w;
        const int* pair = p.pairs + 2 * t;
        p.y[pair[1] * p.w + (idx - t * p.w)] = p.x[pair[0] * p.x_stride + p.c0 + (idx - t * p.w)];
    }
}

#define KEYS 64          // keys per block
#define DECODE_NT 128    // threads per block (4 warps)
#define KREG 8           // key elements per lane: head dims up to 256

struct DecodeParams {
    compute_t* out;
    const compute_t* qkv;
    const compute_t* cache;
    const int* spans;
    float* part_o;
    float* part_ml;
    int h;
    int hkv;
    int dh;
    int chunks;
    float scale;
};

// Grid (C, Hkv, B), DECODE_NT threads. Dynamic shared memory: the group's G queries [G][Dh]
// (scaled) and their scores, then probabilities, [G][KEYS], all f32.
// Scores: warp w takes keys w, w + 4, ...; its lanes hold the key's dims lane + 32i in
// registers and reduce one dot product per query head with shuffles. Softmax: one warp per
// head. Output: thread per (head, dim) pair, Σ_j p[j]·v[j][d] over the chunk (a value row is
// read by the G heads' threads, from L1 after the first).
extern "C" __global__ void KNAME(decode_attn_chunk)(const DecodeParams p) {
    extern __shared__ float smem[];
    const int c = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int first = p.spans[2 * b], len = p.spans[2 * b + 1];
    const int k0 = c * KEYS;
    if (k0 >= len) return;  // past this sequence's keys: the combine reads only its chunks
    const int nk = min(KEYS, len - k0);
    const int G = p.h / p.hkv, dh = p.dh;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* q = smem;           // [G][dh]
    float* s = q + G * dh;     // [G][KEYS]
    const i64 qw = (i64)(p.h + 2 * p.hkv) * dh, cw = (i64)2 * p.hkv * dh;
    for (int i = threadIdx.x; i < G * dh; i += DECODE_NT)
        q[i] = ld(p.qkv, b * qw + (i64)g * G * dh + i) * p.scale;
    __syncthreads();

    const compute_t* keys = p.cache + (i64)(first + k0) * cw + (i64)g * dh;
    for (int j = warp; j < nk; j += DECODE_NT / 32) {
        float kr[KREG];
#pragma unroll
        for (int i = 0; i < KREG; ++i) {
            int d = lane + 32 * i;
            kr[i] = d < dh ? ld(keys, (i64)j * cw + d) : 0.f;
        }
        for (int gg = 0; gg < G; ++gg) {
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < KREG; ++i) {
                int d = lane + 32 * i;
                if (d < dh) acc += q[gg * dh + d] * kr[i];
            }
            acc = warp_sum(acc);
            if (lane == 0) s[gg * KEYS + j] = acc;
        }
    }
    __syncthreads();

    const i64 part = ((i64)b * p.h + (i64)g * G) * p.chunks + c;  // head gg adds gg*chunks
    for (int gg = warp; gg < G; gg += DECODE_NT / 32) {
        float* row = s + gg * KEYS;
        float m = -INF_F;
        for (int j = lane; j < nk; j += 32) m = fmaxf(m, row[j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < nk; j += 32) {
            float e = expf(row[j] - m);
            row[j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            i64 at = part + (i64)gg * p.chunks;
            p.part_ml[2 * at] = m;
            p.part_ml[2 * at + 1] = l;
        }
    }
    __syncthreads();

    const compute_t* vals = keys + (i64)p.hkv * dh;
    for (int i = threadIdx.x; i < G * dh; i += DECODE_NT) {
        int gg = i / dh, d = i - gg * dh;
        const float* pr = s + gg * KEYS;
        float acc = 0.f;
        for (int j = 0; j < nk; ++j) acc += pr[j] * ld(vals, (i64)j * cw + d);
        p.part_o[(part + (i64)gg * p.chunks) * dh + d] = acc;
    }
}

// Grid (B*H), DECODE_NT threads: out[b, h] = Σ_c e^(m_c - M) o_c / Σ_c e^(m_c - M) l_c over the
// chunks c of sequence b (none: zeros).
extern "C" __global__ void KNAME(decode_attn_combine)(const DecodeParams p) {
    const int bh = blockIdx.x, b = bh / p.h;
    const int len = p.spans[2 * b + 1];
    const int nc = (len + KEYS - 1) / KEYS;
    const float* ml = p.part_ml + (i64)bh * p.chunks * 2;
    float m = -INF_F;
    for (int c = 0; c < nc; ++c) m = fmaxf(m, ml[2 * c]);
    float l = 0.f;
    for (int c = 0; c < nc; ++c) l += expf(ml[2 * c] - m) * ml[2 * c + 1];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float* po = p.part_o + (i64)bh * p.chunks * p.dh;
    for (int d = threadIdx.x; d < p.dh; d += DECODE_NT) {
        float acc = 0.f;
        for (int c = 0; c < nc; ++c) acc += expf(ml[2 * c] - m) * po[(i64)c * p.dh + d];
        p.out[(i64)bh * p.dh + d] = to_c(acc * inv);
    }
}
