//! Merging an adapter into its base: `W[c0 + o, :] += s · Σ_k B[o, k] · A[k, :]` for every
//! adapter, on the host, row-parallel, accumulating each row's delta in f64. The result is an
//! ordinary model that the weights writer saves as an HF checkpoint.

use rayon::prelude::*;

use nopad_backend::cpu::Scalar;

use super::{AdapterLayout, LoraConfig};
use crate::layout::Layout;

/// Adds every adapter of `adapter` (values `vals`, laid out by `alayout`) into `base` (the
/// base parameters, laid out by `layout`).
pub fn merge<T: Scalar>(
    layout: &Layout,
    lora: &LoraConfig,
    alayout: &AdapterLayout,
    vals: &[T],
    base: &mut [T],
) {
    let (s, r) = (lora.scale() as f64, alayout.r);
    for (lr, mods) in layout.layers.iter().zip(&alayout.layers) {
        for m in mods {
            let w = m.base_weight(lr);
            let (a, bm) = (&vals[m.a.clone()], &vals[m.b.clone()]);
            let rows = &mut base[w][m.c0 * m.d_in..(m.c0 + m.d_out) * m.d_in];
            rows.par_chunks_mut(m.d_in)
                .enumerate()
                .for_each(|(o, row)| {
                    let mut acc = vec![0f64; m.d_in];
                    for (k, &bk) in bm[o * r..(o + 1) * r].iter().enumerate() {
                        let ak = &a[k * m.d_in..(k + 1) * m.d_in];
                        for (d, &v) in acc.iter_mut().zip(ak) {
                            *d += bk.to_f64() * v.to_f64();
                        }
                    }
                    for (x, d) in row.iter_mut().zip(&acc) {
                        *x = T::from_f64(x.to_f64() + s * d);
                    }
                });
        }
    }
}
