// attention.cuh: what attention_fwd.cu and attention_bwd.cu share (compile.rs puts it after
// prelude.cuh and before each of them): the tile sizes, the launch parameters and the
// zero-padded row loader.

#define BR 64
#define BC 64
#define NT 256
#define DPT 32   // head dims per thread: 128 / 4

struct AttnParams {
    compute_t* out;          // fwd: out; bwd: d_qkv
    float* lse;
    const compute_t* qkv;
    const compute_t* d_out;  // bwd only
    const compute_t* o;      // bwd only (the forward output)
    const float* delta;      // bwd: rowsum(dO * O), [H, N] (written by attention_bwd_delta)
    const int* cu;
    const int* tiles;
    int n;
    int h;
    int hkv;
    int dh;
    float scale;
};

// Loads rows [row0, row0 + 64) of one head's slice of src (qkv or d_out, rows `width` apart)
// into s[64][sld], zero past `len`.
__device__ void load_rows(float* s, int sld, const compute_t* src, i64 width, int seq_start, int row0,
                          int len, int col, int dh) {
    for (int idx = threadIdx.x; idx < 64 * dh; idx += NT) {
        int r = idx / dh, d = idx - r * dh;
        int i = row0 + r;
        s[r * sld + d] = i < len ? ld(src, (i64)(seq_start + i) * width + col + d) : 0.f;
    }
}
