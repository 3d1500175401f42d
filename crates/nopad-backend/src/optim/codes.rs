//! The number formats of low-precision optimizer states, computed on the host and shared by
//! every backend, so that the CPU reference and the CUDA kernels (`cuda/adamw.cu`, which mirrors
//! each function here operation for operation) store the same bits:
//!
//! - bf16 rounding to nearest even (moments in [`crate::StatePrecision::Bf16`]);
//! - the 256-entry dynamic code maps of block-wise 8-bit quantisation and the nearest-code
//!   search ([`crate::StatePrecision::Block8`]);
//! - stochastic rounding to bf16 with a counter-based hash of (seed, step, element index), for
//!   weights kept without an fp32 master copy ([`crate::ParamRounding::Stochastic`]).

/// Values per quantisation block of [`crate::StatePrecision::Block8`]: each block of a moment has
/// its own f32 scale (the block's largest magnitude).
pub const QUANT_BLOCK: usize = 256;

/// The bits of the bf16 nearest to `x`, ties to even; NaN becomes the canonical quiet NaN.
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fc0;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// The dynamic code map of block-wise 8-bit quantisation (Dettmers et al. 2022, "8-bit
/// Optimizers via Block-wise Quantization", dynamic tree quantisation): 256 distinct f32 values,
/// sorted ascending, in [-1, 1] (`signed`, for the first moment) or [0, 1] (for the second).
///
/// A code is read as: a sign bit (signed map only), then a run of k zero bits ended by a one
/// bit, giving the decimal exponent 10^-k, then the remaining f bits, a linear fraction. So the
/// magnitudes of exponent k are `10^-k · (0.1 + 0.9·(j + 1) / 2^f)`, j = 0..2^f, ending at
/// exactly 10^-k: fine steps near 1 (k = 0 has the most fraction bits) and a range down to
/// 10^-6 (signed) or 10^-7 (unsigned). The paper takes the middle of each fraction interval; the
/// upper end is taken here so that ±1 is a code: the block's largest value, which the scale
/// maps to ±1, is then stored exactly. The pattern without a one bit is 0. In the signed map the
/// magnitudes are mirrored; the pattern "sign bit, no one bit" (which would be -0) is given the
/// value +10^-7, so all 256 codes are distinct: the map is symmetric about 0 apart from that one
/// code.
pub fn code_map(signed: bool) -> [f32; 256] {
    let bits = if signed { 7 } else { 8 };
    let mut mags = Vec::with_capacity(256);
    for k in 0..bits {
        let f = bits - 1 - k;
        let count = 1u32 << f;
        let exp = 10f64.powi(k);
        for j in 0..count {
            mags.push(((0.1 + 0.9 * (j + 1) as f64 / count as f64) / exp) as f32);
        }
    }
    let mut vals = vec![0.0f32];
    vals.extend(&mags);
    if signed {
        vals.extend(mags.iter().map(|&x| -x));
        vals.push(1e-7);
    }
    vals.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&vals);
    map
}

/// The index of the code nearest to `x` (the lower one on a tie); `x` below the first code gives
/// 0, above the last 255. A branch-free binary search: eight comparisons, as in the kernel.
pub fn nearest_code(map: &[f32; 256], x: f32) -> u8 {
    let mut i = 0usize;
    let mut step = 128;
    while step > 0 {
        if map[i + step] <= x {
            i += step;
        }
        step >>= 1;
    }
    if i < 255 && map[i + 1] - x < x - map[i] {
        i += 1;
    }
    i as u8
}

/// Quantises one block in place of `codes`: the scale is the block's largest magnitude, each
/// value becomes the code nearest to `value / scale` (0 when the block is all zero). Returns the
/// scale. The host-side form of what the update does per block, for tests and conversions.
pub fn quantise_block(map: &[f32; 256], vals: &[f32], codes: &mut [u8]) -> f32 {
    let absmax = vals.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
    for (c, &x) in codes.iter_mut().zip(vals) {
        *c = nearest_code(map, if absmax > 0.0 { x / absmax } else { 0.0 });
    }
    absmax
}

/// The value of a code under a block's scale.
pub fn dequantise(map: &[f32; 256], code: u8, scale: f32) -> f32 {
    map[code as usize] * scale
}

/// The splitmix64 finaliser: a bijective 64-bit mix whose output bits each depend on every
/// input bit.
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of one optimizer step's stochastic rounding: the random bits of element `i` are the
/// top 16 bits of `mix64(key + i)`. Computed once per step on the host, so a kernel hashes once
/// per element.
pub fn sr_key(seed: u64, step: u64) -> u64 {
    mix64(seed ^ mix64(step.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// `x` rounded to one of its two neighbouring bf16 values at random, up with probability equal
/// to the distance from the lower one over the gap (unbiased: the expected result is `x`). The 16
/// random bits come from `(key, index)`, so the same step rounds the same element the same way
/// on every backend. Infinities stay, NaN becomes the canonical quiet NaN.
pub fn round_bf16_stochastic(x: f32, key: u64, index: u64) -> f32 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return f32::from_bits(0x7fc0_0000);
    }
    let r = if u & 0x7f80_0000 == 0x7f80_0000 {
        0
    } else {
        (mix64(key.wrapping_add(index)) >> 48) as u32
    };
    // Sign and magnitude: adding to the magnitude's low half and truncating rounds the
    // magnitude up with probability low/2^16, whatever the sign.
    f32::from_bits(u.wrapping_add(r) & 0xffff_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut z = 1u64;
        for _ in 0..200_000 {
            z = mix64(z);
            let x = f32::from_bits(z as u32);
            if x.is_nan() {
                assert_eq!(bf16_bits(x), 0x7fc0);
                continue;
            }
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
        }
        // Ties go to even.
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
    }

    #[test]
    fn code_maps_are_sorted_distinct_and_span_their_range() {
        for signed in [true, false] {
            let map = code_map(signed);
            assert!(map.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
            assert_eq!(map[255], 1.0);
            assert!(map.contains(&0.0));
            if signed {
                assert_eq!(map[0], -1.0);
                // Symmetric about 0 apart from the one extra code.
                let asym: Vec<f32> = map.iter().copied().filter(|x| !map.contains(&-x)).collect();
                assert_eq!(asym, vec![1e-7]);
                // Finest steps near 1: 0.9 / 64 apart.
                assert!((map[255] - map[254] - 0.9 / 64.0).abs() < 1e-6);
            } else {
                assert_eq!(map[0], 0.0);
                assert!(map.iter().all(|&x| (0.0..=1.0).contains(&x)));
                assert!((map[255] - map[254] - 0.9 / 128.0).abs() < 1e-6);
                assert!((map[1] - 1e-7).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn nearest_code_is_the_nearest() {
        for signed in [true, false] {
            let map = code_map(signed);
            let mut z = 3u64;
            for t in 0..20_000 {
                z = mix64(z);
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                // Uniform values, and values near the small codes.
                let mut x = if t % 2 == 0 { u } else { u.powi(8) } as f32;
                if signed && z & 1 == 1 {
                    x = -x;
                }
                let c = nearest_code(&map, x) as usize;
                let best = map
                    .iter()
                    .map(|&m| (m - x).abs())
                    .fold(f32::INFINITY, f32::min);
                assert_eq!((map[c] - x).abs(), best, "{x:e} -> {}", map[c]);
            }
            // Every code is its own nearest code, and out-of-range values clamp.
            for (i, &m) in map.iter().enumerate() {
                assert_eq!(nearest_code(&map, m) as usize, i);
            }
            assert_eq!(nearest_code(&map, 2.0), 255);
            assert_eq!(nearest_code(&map, -2.0), 0);
        }
    }

    #[test]
    fn block_round_trip_error_is_bounded() {
        // The error of a value is at most half the gap between the codes around value/scale,
        // times the scale; the largest gap is 0.9/64 (signed) or 0.9/128 (unsigned) of the
        // scale, and the block maximum is exact.
        let mut z = 11u64;
        for signed in [true, false] {
            let map = code_map(signed);
            let gap = if signed { 0.9 / 64.0 } else { 0.9 / 128.0 };
            for block in 0..200 {
                let vals: Vec<f32> = (0..QUANT_BLOCK)
                    .map(|_| {
                        z = mix64(z);
                        let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                        let mag = u * 10f32.powi(-(block % 5));
                        if signed && z & 1 == 1 {
                            -mag
                        } else {
                            mag
                        }
                    })
                    .collect();
                let mut codes = vec![0u8; QUANT_BLOCK];
                let scale = quantise_block(&map, &vals, &mut codes);
                let absmax = vals.iter().fold(0f32, |a, x| a.max(x.abs()));
                assert_eq!(scale, absmax);
                for (&x, &c) in vals.iter().zip(&codes) {
                    let back = dequantise(&map, c, scale);
                    let err = (back - x).abs();
                    assert!(err <= 0.5 * gap * scale * 1.0001, "{x:e} -> {back:e}");
                    if x.abs() == absmax {
                        assert_eq!(back, x, "the block maximum is exact");
                    }
                }
            }
            // An all-zero block: scale 0, every value back to 0.
            let mut codes = vec![7u8; 3];
            assert_eq!(quantise_block(&map, &[0.0; 3], &mut codes), 0.0);
            assert!(codes.iter().all(|&c| map[c as usize] == 0.0));
        }
    }

    #[test]
    fn stochastic_rounding_is_deterministic_and_unbiased() {
        let key = sr_key(42, 7);
        assert_ne!(key, sr_key(42, 8));
        assert_ne!(key, sr_key(43, 7));
        let mut z = 5u64;
        for _ in 0..50 {
            z = mix64(z);
            let x = f32::from_bits((z as u32 & 0x3fff_ffff) | 0x3000_0000) * 0.37;
            let lo = f32::from_bits(x.to_bits() & 0xffff_0000);
            let hi = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
            let n = 40_000u64;
            let mut sum = 0f64;
            for i in 0..n {
                let r = round_bf16_stochastic(x, key, i);
                assert!(r == lo || r == hi, "{x:e} -> {r:e}");
                assert_eq!(r.to_bits(), round_bf16_stochastic(x, key, i).to_bits());
                sum += r as f64;
            }
            // Mean of n Bernoulli draws: standard deviation gap·0.5/√n; allow 5 of them.
            let mean = sum / n as f64;
            let gap = (hi - lo) as f64;
            let bound = 5.0 * 0.5 * gap / (n as f64).sqrt();
            assert!((mean - x as f64).abs() <= bound, "{x:e}: mean {mean:e}");
            // Negative values round the same way in magnitude.
            assert_eq!(
                round_bf16_stochastic(-x, key, 3),
                -round_bf16_stochastic(x, key, 3)
            );
        }
        // Representable values stay, specials too.
        assert_eq!(round_bf16_stochastic(1.5, key, 9), 1.5);
        assert_eq!(round_bf16_stochastic(f32::INFINITY, key, 9), f32::INFINITY);
        assert!(round_bf16_stochastic(f32::NAN, key, 9).is_nan());
    }
}
