// elementwise.cu: residual adds and scaling. out, a, b: [n] of compute_t; fp32 arithmetic.
// Grid: flat, one thread per element (grid-stride).

struct AddParams {
    compute_t* out;
    const compute_t* a;
    const compute_t* b;
    i64 n;
};

// out[i] = a[i] + b[i]
extern "C" __global__ void KNAME(add)(const AddParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x)
        p.out[i] = to_c(ld(p.a, i) + ld(p.b, i));
}

// out[i] += a[i]  (b unused)
extern "C" __global__ void KNAME(add_assign)(const AddParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x)
        p.out[i] = to_c(ld(p.out, i) + ld(p.a, i));
}

// The same, 8 elements per thread (n % 8 == 0, 16-byte aligned buffers): out[i] = x[i] + y[i].
__device__ __forceinline__ void add_v8_into(compute_t* out, const compute_t* x, const compute_t* y, i64 n) {
    for (i64 i = (blockIdx.x * (i64)blockDim.x + threadIdx.x) * 8; i < n; i += (i64)gridDim.x * blockDim.x * 8) {
        f8 a = ld8(x, i), b = ld8(y, i);
#pragma unroll
        for (int k = 0; k < 8; ++k) a.v[k] += b.v[k];
        st8(out, i, a);
    }
}

extern "C" __global__ void KNAME(add_v8)(const AddParams p) { add_v8_into(p.out, p.a, p.b, p.n); }

extern "C" __global__ void KNAME(add_assign_v8)(const AddParams p) { add_v8_into(p.out, p.out, p.a, p.n); }

struct ScaleParams {
    compute_t* x;
    i64 n;
    float s;
};

// x[i] *= s  (an adapter's scale)
extern "C" __global__ void KNAME(scale)(const ScaleParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x)
        p.x[i] = to_c(ld(p.x, i) * p.s);
}
