// bwd_convert.cu: the atomic backward's last step, dQ = bf16(scale * dqacc) into d_qkv.
//
// Computes, per query tile (seq_start, L, m, pad) and query head h, for rows i = 64m.. < L:
//   d_qkv[seq_start + i, h, :] = bf16(scale * dqacc[h, pad + i, :])
// Shapes: dqacc [H, Tpad, DH] fp32 (padded, bwd_prep zeroed it, bwd_dkdv_dq accumulated it);
//         d_qkv [N, (H + 2 Hkv) * DH] bf16, q part written here.
// Geometry: 1-D grid of tiles x heads (heads fastest), 128 threads; each thread converts 4
// consecutive columns per row (one float4 read, one 8-byte store). No accumulation.

template <int DH>
__device__ __forceinline__ void flash_bwd_convert(const float* __restrict__ dqacc,
                                                  bf16_t* __restrict__ d_qkv,
                                                  const int4* __restrict__ tiles, int H, int Hkv,
                                                  int Tpad, float scale) {
    const int h = blockIdx.x % H;
    const int4 tile = tiles[blockIdx.x / H];
    const long long rs = (long long)(H + 2 * Hkv) * DH;
    constexpr int PER_ROW = DH / 4;
    for (int x = threadIdx.x; x < 64 * PER_ROW; x += 128) {
        int r = x / PER_ROW, c = (x % PER_ROW) * 4;
        int i = max(tile.z, 0) * 64 + r;
        if (i >= tile.y) continue;
        float4 v = *(const float4*)(dqacc + ((long long)h * Tpad + tile.w + i) * DH + c);
        uint2 o = make_uint2(pack_bf16(v.x * scale, v.y * scale), pack_bf16(v.z * scale, v.w * scale));
        *(uint2*)(d_qkv + (long long)(tile.x + i) * rs + h * DH + c) = o;
    }
}

extern "C" __global__ void __launch_bounds__(128)
    flash_bwd_convert_64(const float* dqacc, bf16_t* d_qkv, const int4* tiles, int H, int Hkv,
                         int Tpad, float scale) {
    flash_bwd_convert<64>(dqacc, d_qkv, tiles, H, Hkv, Tpad, scale);
}
extern "C" __global__ void __launch_bounds__(128)
    flash_bwd_convert_128(const float* dqacc, bf16_t* d_qkv, const int4* tiles, int H, int Hkv,
                          int Tpad, float scale) {
    flash_bwd_convert<128>(dqacc, d_qkv, tiles, H, Hkv, Tpad, scale);
}
