// adamw.cu: one AdamW step over a flat parameter range (multi-tensor: the whole flat buffer in
// one launch). grad, m, v: [n] f32; master: [n] f32 or null; param: [n] compute_t.
// With a master copy the update is applied to it and param is refreshed from it; without, param
// itself is updated. Bias corrections are computed on the host.

struct AdamwParams {
    compute_t* param;
    float* master;
    const float* grad;
    float* m;
    float* v;
    i64 n;
    float lr;
    float beta1;
    float beta2;
    float eps;
    float weight_decay;
    float grad_scale;
    float bc1;   // 1 - beta1^step
    float bc2;   // 1 - beta2^step
};

extern "C" __global__ void KNAME(adamw)(const AdamwParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        float g = p.grad[i] * p.grad_scale;
        float m = p.beta1 * p.m[i] + (1.f - p.beta1) * g;
        float v = p.beta2 * p.v[i] + (1.f - p.beta2) * g * g;
        p.m[i] = m;
        p.v[i] = v;
        float w = p.master ? p.master[i] : ld(p.param, i);
        w -= p.lr * p.weight_decay * w;
        w -= p.lr * (m / p.bc1) / (sqrtf(v / p.bc2) + p.eps);
        if (p.master) p.master[i] = w;
        p.param[i] = to_c(w);
    }
}
