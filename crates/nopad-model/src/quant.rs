//! QLoRA's 4-bit base weights: a `[out, in]` matrix quantised to NF4 on the host, as
//! bitsandbytes does it (the format, and what dequantisation reads, is
//! [`nopad_backend::nf4`]): the matrix flattened row-major in blocks of 64, each weight the NF4
//! code nearest to `weight / absmax` of its block (a tie goes to the lower code), the block
//! absmaxes double-quantised (their f32 mean subtracted, the rest in blocks of 256 as 8-bit codes
//! of the signed dynamic map with an f32 absmax each, nearest code, a tie to the lower one).
//! The base's dtype setting ([`BaseDtype`]) is here too.

use nopad_backend::codes::{code_map, quantise_block, QUANT_BLOCK};
use nopad_backend::nf4::{dequantise_nf4, nf4_lens, NF4, NF4_BLOCK};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// How a LoRA run holds its frozen base's projection matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BaseDtype {
    /// The backend's Compute type (bf16 on CUDA, f32 or f64 on the CPU): plain LoRA.
    #[default]
    Bf16,
    /// NF4 with double-quantised scales (QLoRA).
    Nf4,
}

impl BaseDtype {
    /// Parses `bf16` or `nf4`; `what` names the source in errors.
    pub fn parse(s: &str, what: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(BaseDtype::Bf16),
            "nf4" => Ok(BaseDtype::Nf4),
            _ => Err(ModelError::Input(format!(
                "{what}: unknown base dtype {s:?}; expected bf16 or nf4"
            ))),
        }
    }

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::Bf16 => "bf16",
            BaseDtype::Nf4 => "nf4",
        }
    }
}

/// One matrix in NF4 (lengths: [`nf4_lens`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Matrix {
    /// Weights.
    pub n: usize,
    /// Two 4-bit codes a byte, the first element in the high nibble.
    pub codes: Vec<u8>,
    /// Each block absmax's 8-bit code.
    pub scale_codes: Vec<u8>,
    /// The absmax of each 256 block scales, then the scales' mean.
    pub absmax: Vec<f32>,
}

/// The NF4 code nearest to `x` (in `[-1, 1]`), the lower one on a tie.
pub fn nearest_nf4(x: f32) -> u8 {
    // The codes are sorted: the first whose successor is no nearer.
    let mut i = 0;
    while i < 15 && NF4[i + 1] - x < x - NF4[i] {
        i += 1;
    }
    i as u8
}

/// Quantises `w` (a matrix flattened row-major) to NF4.
pub fn quantise(w: &[f32]) -> Nf4Matrix {
    let n = w.len();
    let (nc, nb, na) = nf4_lens(n);
    let mut codes = vec![0u8; nc];
    // Blocks are independent and a block's 64 codes fill 32 whole bytes, so the blocks are
    // quantised in parallel (an 8B model's 7B projection weights take minutes on one core).
    let scales: Vec<f32> = w
        .par_chunks(NF4_BLOCK)
        .zip(codes.par_chunks_mut(NF4_BLOCK / 2))
        .map(|(vals, out)| {
            let absmax = vals.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
            for (j, &x) in vals.iter().enumerate() {
                let c = nearest_nf4(if absmax > 0.0 { x / absmax } else { 0.0 });
                out[j / 2] |= if j.is_multiple_of(2) { c << 4 } else { c };
            }
            absmax
        })
        .collect();
    debug_assert_eq!(scales.len(), nb);
    let mean = if nb == 0 {
        0.0
    } else {
        (scales.iter().map(|&s| s as f64).sum::<f64>() / nb as f64) as f32
    };
    let centred: Vec<f32> = scales.iter().map(|&s| s - mean).collect();
    let map = code_map(true);
    let mut scale_codes = vec![0u8; nb];
    let mut absmax = Vec::with_capacity(na);
    for (vals, out) in centred
        .chunks(QUANT_BLOCK)
        .zip(scale_codes.chunks_mut(QUANT_BLOCK))
    {
        absmax.push(quantise_block(&map, vals, out));
    }
    absmax.push(mean);
    Nf4Matrix {
        n,
        codes,
        scale_codes,
        absmax,
    }
}

impl Nf4Matrix {
    /// The weights as dequantisation reads them (what the model's GEMMs see, before rounding to
    /// the Compute type).
    pub fn dequantise(&self) -> Vec<f32> {
        dequantise_nf4(self.n, &self.codes, &self.scale_codes, &self.absmax)
    }
}

/// The values a base held as `base` computes with, for host values written at `offset` of
/// `layout`: an NF4 base's projection matrices (which come first, before the embedding; each
/// written whole) come back through their NF4 round trip, everything else as given. What
/// `nopad merge` merges into for an adapter trained over an NF4 base.
pub fn as_base<'v>(
    base: BaseDtype,
    layout: &crate::Layout,
    offset: usize,
    vals: &'v [f32],
) -> std::borrow::Cow<'v, [f32]> {
    match base {
        BaseDtype::Nf4 if offset < layout.embed.start => quantise(vals).dequantise().into(),
        _ => vals.into(),
    }
}

#[cfg(test)]
mod tests;
