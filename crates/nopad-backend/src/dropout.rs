//! The dropout mask, defined once for every backend: a counter-based hash of `(seed, index)`, so
//! the mask of any element is known without saving it and the CUDA kernel (`cuda/adapter.cu`,
//! which mirrors these lines) draws exactly the CPU's mask.

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The drop threshold of probability `p` on the hash's 24-bit scale.
pub fn dropout_threshold(p: f32) -> u32 {
    ((p as f64) * (1u64 << 24) as f64).round() as u32
}

/// Whether element `i` survives under `seed` and `threshold` ([`dropout_threshold`]).
pub fn dropout_keep(seed: u64, i: u64, threshold: u32) -> bool {
    let h = mix64(seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    ((h >> 40) as u32) >= threshold
}

/// The factor of a kept element, `1 / (1 − p)`.
pub fn dropout_scale(p: f32) -> f64 {
    1.0 / (1.0 - p as f64)
}
