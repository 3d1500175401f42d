// adamw.cu: one AdamW step over a flat parameter range (multi-tensor: the whole flat buffer in
// one launch). grad, m, v: [n] f32; master: [n] f32 or null; param: [n] compute_t.
// With a master copy the update is applied to it and param is refreshed from it; without, param
// itself is updated. Bias corrections are computed on the host (as the CPU backend does).

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
    float grad_scale;
    float decay;      // 1 - lr * weight_decay
    float step_size;  // lr / (1 - beta1^step)
    float bc2_sqrt;   // sqrt(1 - beta2^step)
};

extern "C" __global__ void KNAME(adamw)(const AdamwParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        // The same arithmetic, in the same order, as torch.optim.AdamW (and the CPU backend).
        float g = p.grad[i] * p.grad_scale;
        float w = p.master ? p.master[i] : ld(p.param, i);
        w *= p.decay;
        float m = p.m[i] * p.beta1 + g * (1.f - p.beta1);
        float v = p.v[i] * p.beta2 + g * g * (1.f - p.beta2);
        p.m[i] = m;
        p.v[i] = v;
        float denom = sqrtf(v) / p.bc2_sqrt + p.eps;
        w -= p.step_size * m / denom;
        if (p.master) p.master[i] = w;
        p.param[i] = to_c(w);
    }
}
