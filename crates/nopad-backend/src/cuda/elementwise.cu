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

// The same, 8 elements per thread (n % 8 == 0, 16-byte aligned buffers).
extern "C" __global__ void KNAME(add_v8)(const AddParams p) {
    for (i64 i = (blockIdx.x * (i64)blockDim.x + threadIdx.x) * 8; i < p.n; i += (i64)gridDim.x * blockDim.x * 8) {
        f8 a = ld8(p.a, i), b = ld8(p.b, i);
#pragma unroll
        for (int k = 0; k < 8; ++k) a.v[k] += b.v[k];
        st8(p.out, i, a);
    }
}

extern "C" __global__ void KNAME(add_assign_v8)(const AddParams p) {
    for (i64 i = (blockIdx.x * (i64)blockDim.x + threadIdx.x) * 8; i < p.n; i += (i64)gridDim.x * blockDim.x * 8) {
        f8 o = ld8(p.out, i), a = ld8(p.a, i);
#pragma unroll
        for (int k = 0; k < 8; ++k) o.v[k] += a.v[k];
        st8(p.out, i, o);
    }
}

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
