//! The NF4 number format of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
//! Quantized LLMs") as bitsandbytes stores it, computed on the host and shared by every backend,
//! so that the CPU reference and the CUDA kernel (`cuda/quant.cu`, which mirrors
//! [`dequant_value`] operation for operation) produce the same bits:
//!
//! - 16 code values, the paper's table ([`NF4`], bitsandbytes' exact f32 constants), two 4-bit
//!   codes per byte: element `2i` in the high nibble, `2i + 1` in the low one (bitsandbytes'
//!   order; an odd count leaves the last low nibble 0);
//! - blocks of [`NF4_BLOCK`] = 64 weights, each with a scale, its largest magnitude;
//! - double quantisation of the scales: their mean `c` (f32) is subtracted and `scale − c` is
//!   stored as 8-bit codes of the signed dynamic map ([`crate::codes::code_map`]) in blocks of
//!   [`crate::codes::QUANT_BLOCK`] = 256 scales, each with an f32 absmax. A block's scale is
//!   read back as `map[code] · absmax + c` (a product, then a sum, each rounded to f32).
//!
//! The quantisation itself (nearest code) lives in `nopad_model::quant`; this module owns what
//! dequantisation reads.

use crate::codes::{code_map, QUANT_BLOCK};

/// The 16 NF4 code values, ascending (bitsandbytes' `NF4` table).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per NF4 block (one scale each).
pub const NF4_BLOCK: usize = 64;

/// The lengths of an NF4 matrix of `n` weights: packed code bytes, block scales (one 8-bit code
/// each), and the f32 values of the double quantisation (one absmax per 256 scales, then the
/// mean).
pub fn nf4_lens(n: usize) -> (usize, usize, usize) {
    let blocks = n.div_ceil(NF4_BLOCK);
    (n.div_ceil(2), blocks, blocks.div_ceil(QUANT_BLOCK) + 1)
}

/// The scale of block `blk`: `map[scale_codes[blk]] · absmax[blk / 256] + mean`, the mean being
/// the last element of `absmax`.
pub fn block_scale(map: &[f32; 256], scale_codes: &[u8], absmax: &[f32], blk: usize) -> f32 {
    let mean = absmax[absmax.len() - 1];
    map[scale_codes[blk] as usize] * absmax[blk / QUANT_BLOCK] + mean
}

/// The 4-bit code of element `i` in the packed bytes.
pub fn code_at(codes: &[u8], i: usize) -> u8 {
    let byte = codes[i / 2];
    if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 15
    }
}

/// Element `i` of an NF4 matrix: `NF4[code] · scale` of its block.
pub fn dequant_value(
    map: &[f32; 256],
    codes: &[u8],
    scale_codes: &[u8],
    absmax: &[f32],
    i: usize,
) -> f32 {
    NF4[code_at(codes, i) as usize] * block_scale(map, scale_codes, absmax, i / NF4_BLOCK)
}

/// Every element of an NF4 matrix of `n` weights, in f32 (the host form of the op
/// `Ops::dequant_nf4`).
pub fn dequantise_nf4(n: usize, codes: &[u8], scale_codes: &[u8], absmax: &[f32]) -> Vec<f32> {
    let map = code_map(true);
    (0..n)
        .map(|i| dequant_value(&map, codes, scale_codes, absmax, i))
        .collect()
}
