//! NF4 quantisation against a straightforward reference (same codes, same scales, exactly) and
//! its round-trip error.

use nopad_backend::codes::code_map;
use nopad_backend::nf4::{NF4, NF4_BLOCK};
use nopad_rng::Rng;

use super::*;

/// The index of the nearest of `table` to `x`, the first on a tie: a plain scan.
fn argmin(table: &[f32], x: f32) -> usize {
    let mut best = 0;
    for (k, &c) in table.iter().enumerate() {
        if (x - c).abs() < (x - table[best]).abs() {
            best = k;
        }
    }
    best
}

/// The reference: element by element, block by block, sharing nothing with `quantise` but the
/// tables.
fn reference(w: &[f32]) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let blocks: Vec<&[f32]> = w.chunks(64).collect();
    let scales: Vec<f32> = blocks
        .iter()
        .map(|b| b.iter().map(|x| x.abs()).fold(0.0, f32::max))
        .collect();
    let mut nibbles = Vec::new();
    for (b, &s) in blocks.iter().zip(&scales) {
        for &x in *b {
            nibbles.push(argmin(&NF4, if s > 0.0 { x / s } else { 0.0 }) as u8);
        }
    }
    if nibbles.len() % 2 == 1 {
        nibbles.push(0);
    }
    let codes = nibbles.chunks(2).map(|p| p[0] * 16 + p[1]).collect();
    let mean = (scales.iter().map(|&s| s as f64).sum::<f64>() / scales.len().max(1) as f64) as f32;
    let map = code_map(true);
    let (mut sc, mut am) = (Vec::new(), Vec::new());
    for chunk in scales.chunks(256) {
        let c: Vec<f32> = chunk.iter().map(|&s| s - mean).collect();
        let a = c.iter().map(|x| x.abs()).fold(0.0, f32::max);
        am.push(a);
        for &x in &c {
            sc.push(argmin(&map, if a > 0.0 { x / a } else { 0.0 }) as u8);
        }
    }
    am.push(mean);
    (codes, sc, am)
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    // Blocks of differing ranges, as a trained matrix's rows have.
    (0..n)
        .map(|i| (r.normal() * (0.01 + (i / 64 % 7) as f64 * 0.02)) as f32)
        .collect()
}

#[test]
fn the_table_is_the_papers_and_codes_round_trip() {
    assert_eq!(NF4[0], -1.0);
    assert_eq!(NF4[7], 0.0);
    assert_eq!(NF4[15], 1.0);
    assert_eq!(NF4[14].to_bits(), 0x3f39_13b3); // 0.7229568362236023
    assert!(NF4.windows(2).all(|p| p[0] < p[1]));
    for (k, &c) in NF4.iter().enumerate() {
        assert_eq!(nearest_nf4(c) as usize, k);
    }
    // A tie goes to the lower code.
    assert_eq!(
        nearest_nf4((NF4[9] + NF4[10]) / 2.0),
        argmin(&NF4, (NF4[9] + NF4[10]) / 2.0) as u8
    );
}

#[test]
fn quantisation_matches_the_reference_exactly() {
    // Partial blocks, an odd count, more than 256 blocks, an all-zero block.
    for (n, seed) in [(1, 1), (63, 2), (64, 3), (129, 4), (64 * 300 + 33, 5)] {
        let mut w = random(n, seed);
        if n > 128 {
            w[64..128].fill(0.0);
        }
        let q = quantise(&w);
        let (codes, sc, am) = reference(&w);
        assert_eq!(q.codes, codes, "n={n}");
        assert_eq!(q.scale_codes, sc, "n={n}");
        assert_eq!(q.absmax, am, "n={n}");
        assert_eq!(q.n, n);
    }
}

#[test]
fn the_round_trip_error_is_within_the_nf4_step_per_block() {
    let step = NF4.windows(2).map(|p| p[1] - p[0]).fold(0.0, f32::max);
    let w = random(64 * 700 + 17, 9);
    let q = quantise(&w);
    let back = q.dequantise();
    let mut worst = 0.0f32;
    for (wb, bb) in w.chunks(NF4_BLOCK).zip(back.chunks(NF4_BLOCK)) {
        let absmax = wb.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
        let err = wb
            .iter()
            .zip(bb)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            err <= step * absmax,
            "block error {err} over {step}·{absmax}"
        );
        worst = worst.max(err / absmax);
    }
    // Most of it is the half step of the codes, not the scales' 8 bits.
    assert!(worst > 0.01 && worst < step, "{worst}");
    // Zeros stay zero, and an all-zero matrix comes back as zeros.
    assert!(quantise(&[0.0; 100]).dequantise().iter().all(|&x| x == 0.0));
}

#[test]
fn base_dtypes_parse() {
    assert_eq!(
        BaseDtype::parse("nf4", "--base-dtype").unwrap(),
        BaseDtype::Nf4
    );
    assert_eq!(BaseDtype::parse("bf16", "x").unwrap().name(), "bf16");
    let e = BaseDtype::parse("int4", "--base-dtype")
        .unwrap_err()
        .to_string();
    assert!(e.contains("--base-dtype") && e.contains("int4"), "{e}");
}
