// linear.cu: the bias epilogue of the linear forward (the GEMM itself is cuBLASLt).
// y: [N, out] compute_t, b: [out] compute_t; y[t, o] += b[o] in fp32. Flat grid over N*out.
// The bias gradient is reduce.cu's colsum_partial + partials_finish.

struct BiasParams {
    compute_t* y;
    const compute_t* b;
    i64 n;      // N*out
    int cols;   // out
};

extern "C" __global__ void KNAME(bias_add)(const BiasParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x)
        p.y[i] = to_c(ld(p.y, i) + ld(p.b, i % p.cols));
}
