//! The generation ops on the CPU: rows copied between buffers (a KV cache's append, a gather of
//! each prompt's last row) and the attention of one query per sequence over its cached keys and
//! values. Each (sequence, query head) is one task computing its scores, softmax and weighted
//! sum in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::{Cpu, Scalar};
use crate::args::{CopyRows, DecodeAttn};
use crate::Result;

/// `y[dst, 0..w] = x[src, c0..c0 + w]` for every (src, dst) pair (see [`CopyRows`]).
pub(crate) fn copy_rows<T: Scalar>(a: CopyRows<'_, Cpu<T>>) -> Result<()> {
    a.check(a.pairs, a.x.len(), a.y.len())?;
    let (xs, c0, w) = (a.x_stride, a.c0, a.w);
    for p in a.pairs[..2 * a.n].chunks(2) {
        let (src, dst) = (p[0] as usize, p[1] as usize);
        a.y[dst * w..(dst + 1) * w].copy_from_slice(&a.x[src * xs + c0..src * xs + c0 + w]);
    }
    Ok(())
}

/// One query per sequence against its span of the cache (see [`DecodeAttn`]): scores
/// `scale · q·k` in key order, the softmax from their maximum, then `Σ p·v` in key order.
pub(crate) fn decode_attention<T: Scalar>(a: DecodeAttn<'_, Cpu<T>>) -> Result<()> {
    a.check(a.spans, [a.out.len(), a.qkv.len(), a.cache.len()])?;
    let DecodeAttn {
        out,
        qkv,
        cache,
        spans,
        dims: d,
    } = a;
    let (h, dh, cw, qw) = (d.n_heads, d.head_dim, d.cache_width(), d.qkv_width());
    let group = h / d.n_kv_heads;
    let v_off = d.n_kv_heads * dh;
    let scale = T::from_f32(d.scale);
    out[..d.n_seqs * h * dh]
        .par_chunks_mut(dh)
        .enumerate()
        .for_each(|(bh, o)| {
            let (b, hh) = (bh / h, bh % h);
            let (first, len) = (spans[2 * b] as usize, spans[2 * b + 1] as usize);
            let q = &qkv[b * qw + hh * dh..][..dh];
            let kv = (hh / group) * dh;
            let row = |j: usize| &cache[(first + j) * cw..(first + j + 1) * cw];
            let scores: Vec<T> = (0..len)
                .map(|j| {
                    let k = &row(j)[kv..kv + dh];
                    let mut s = T::ZERO;
                    for (&x, &y) in q.iter().zip(k) {
                        s += x * y;
                    }
                    s * scale
                })
                .collect();
            let m = scores.iter().fold(T::neg_infinity(), |a, &s| a.max(s));
            let p: Vec<T> = scores.iter().map(|&s| (s - m).exp()).collect();
            let mut l = T::ZERO;
            for &x in &p {
                l += x;
            }
            o.fill(T::ZERO);
            for (j, &pj) in p.iter().enumerate() {
                let v = &row(j)[v_off + kv..v_off + kv + dh];
                for (od, &vd) in o.iter_mut().zip(v) {
                    *od += pj * vd;
                }
            }
            if len > 0 {
                let inv = T::ONE / l;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    //! What the two ops refuse (their results are checked against the definition on every
    //! backend in `tests/conformance/decode.rs`).
    use super::*;
    use crate::args::DecodeDims;
    use crate::Ops;

    #[test]
    fn bad_spans_and_pairs_are_refused() {
        let cpu = Cpu::<f32>::new();
        let d = DecodeDims {
            n_seqs: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
        };
        let (q, cache, mut out) = (vec![0.0; 16], vec![0.0; 3 * 8], vec![0.0; 8]);
        let err = cpu
            .decode_attention(DecodeAttn {
                out: &mut out,
                qkv: &q,
                cache: &cache,
                spans: &vec![1, 3],
                dims: d,
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside a cache of 3 rows"), "{err}");
        let (x, mut y) = (vec![1.0f32; 12], vec![0.0f32; 8]);
        let copy = |pairs: Vec<i32>, y: &mut [f32]| {
            cpu.copy_rows(CopyRows {
                y,
                x: &x,
                pairs: &pairs,
                n: 2,
                x_stride: 6,
                c0: 2,
                w: 4,
            })
            .map_err(|e| e.to_string())
        };
        let err = copy(vec![0, 1, 1, 1], &mut y).unwrap_err();
        assert!(err.contains("a second time"), "{err}");
        let err = copy(vec![0, 1, 2, 0], &mut y).unwrap_err();
        assert!(err.contains("outside 2 source"), "{err}");
        copy(vec![1, 0, 0, 1], &mut y).unwrap();
        assert_eq!(y, vec![1.0; 8]);
    }
}
