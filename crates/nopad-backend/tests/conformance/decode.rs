//! The test bodies of generation's ops: `copy_rows` (a KV cache's append: rows scattered to
//! chosen destinations, the others untouched, bit for bit) and `decode_attention` (one query per
//! sequence over its span of a cache: spans out of order and with gaps, lengths 1, a chunk ± 1
//! and several chunks, a sequence with no key, GQA groups of 1 to 8, head dims 4 to 256), the
//! reference itself checked against the definition written out in f64.

use nopad_backend::prelude::*;

use super::Env;

/// Copies `n` rows' columns `c0..c0 + w` of a `[rows, stride]` source to shuffled rows of a
/// `[rows_y, w]` destination.
pub(crate) fn copy_rows<B: Backend>(e: &mut Env<B>) {
    for (n, stride, c0, w, rows_y) in [(1, 1, 0, 1, 1), (5, 24, 16, 8, 9), (37, 40, 8, 32, 50)] {
        let tag = format!("n={n} stride={stride} c0={c0} w={w}");
        let (x, y0) = (
            e.randn(n * stride, 1.0, Kind::Compute),
            e.randn(rows_y * w, 1.0, Kind::Compute),
        );
        let mut dst: Vec<i32> = (0..rows_y as i32).collect();
        for i in (1..dst.len()).rev() {
            dst.swap(i, e.below(i + 1));
        }
        let pairs: Vec<i32> = (0..n).flat_map(|t| [t as i32, dst[t]]).collect();
        let b = &e.b;
        let (gx, mut gy, gp) = (
            e.up(&x, Kind::Compute),
            e.up(&y0, Kind::Compute),
            b.ints(&pairs).unwrap(),
        );
        b.copy_rows(CopyRows {
            y: b.view_mut(&mut gy, 0..rows_y * w),
            x: b.view(&gx, 0..n * stride),
            pairs: &gp,
            n,
            x_stride: stride,
            c0,
            w,
        })
        .unwrap();
        let got = e.down(&gy);
        let mut want = y0.clone();
        for t in 0..n {
            let d = dst[t] as usize;
            want[d * w..(d + 1) * w].copy_from_slice(&x[t * stride + c0..t * stride + c0 + w]);
        }
        assert_eq!(got, want, "copy_rows {tag} on {}", e.name);
        e.check(&format!("copy_rows {tag}"), &got, &want, 0);
    }
}

/// One decode attention on backend `c` over host values `(qkv, cache)` (drawn representable in
/// its Compute type): the output, read back.
fn attend<C: Backend>(
    c: &C,
    (qkv, cache): (&[f64], &[f64]),
    spans: &[i32],
    dims: DecodeDims,
) -> Vec<f64> {
    let up = |v: &[f64]| {
        let mut buf = c.alloc(v.len(), Kind::Compute).unwrap();
        c.write(
            &mut buf,
            0,
            &v.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        )
        .unwrap();
        buf
    };
    let (q, k, s) = (up(qkv), up(cache), c.ints(spans).unwrap());
    let wo = dims.n_seqs * dims.out_width();
    let mut out = up(&vec![f64::NAN; wo]);
    c.decode_attention(DecodeAttn {
        out: c.view_mut(&mut out, 0..wo),
        qkv: c.view(&q, 0..qkv.len()),
        cache: c.view(&k, 0..cache.len()),
        spans: &s,
        dims,
    })
    .unwrap();
    c.read_f64(&out, 0..wo).unwrap()
}

/// The definition: for each sequence and query head, the softmax over all its keys in f64 and
/// the weighted sum of the values, kv head `h·Hkv/H`.
fn definition((q, cache): (&[f64], &[f64]), spans: &[i32], d: DecodeDims) -> Vec<f64> {
    let (h, hkv, dh) = (d.n_heads, d.n_kv_heads, d.head_dim);
    let mut out = Vec::new();
    for (b, span) in spans.chunks(2).enumerate() {
        let rows: Vec<usize> = (span[0]..span[0] + span[1]).map(|r| r as usize).collect();
        for hh in 0..h {
            let g = hh * hkv / h;
            let at = |t: usize, head: usize, e: usize| cache[t * 2 * hkv * dh + head * dh + e];
            let qv = |e: usize| q[b * (h + 2 * hkv) * dh + hh * dh + e];
            let s: Vec<f64> = rows
                .iter()
                .map(|&t| (0..dh).map(|e| qv(e) * at(t, g, e)).sum::<f64>() * d.scale as f64)
                .collect();
            let z: f64 = s.iter().map(|x| x.exp()).sum();
            out.extend((0..dh).map(|e| {
                let terms = rows.iter().zip(&s);
                terms
                    .map(|(&t, &x)| x.exp() / z * at(t, hkv + g, e))
                    .sum::<f64>()
            }));
        }
    }
    out
}

/// Decode attention of sequences of `lens` (spans laid out in reverse order with gaps).
fn decode_case<B: Backend>(e: &mut Env<B>, lens: &[usize], heads: (usize, usize), dh: usize) {
    let dims = DecodeDims {
        n_seqs: lens.len(),
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim: dh,
        scale: 1.0 / (dh as f32).sqrt(),
    };
    let mut spans = vec![0i32; 2 * lens.len()];
    let mut at = 1;
    for (s, &l) in lens.iter().enumerate().rev() {
        spans[2 * s..2 * s + 2].copy_from_slice(&[at, l as i32]);
        at += l as i32 + 1;
    }
    let tag = format!("lens={lens:?} h={}/{} dh={dh}", heads.0, heads.1);
    let qkv = e.randn(lens.len() * dims.qkv_width(), 1.0, Kind::Compute);
    let cache = e.randn(at as usize * dims.cache_width(), 1.0, Kind::Compute);
    let got = attend(&e.b, (&qkv, &cache), &spans, dims);
    let want = attend(&e.r, (&qkv, &cache), &spans, dims);
    e.check(&format!("decode_attention {tag}"), &got, &want, 1);
    if lens.len() < 10 {
        let exact = definition((&qkv, &cache), &spans, dims);
        e.check_tol(
            &format!("decode_attention {tag} (reference)"),
            &want,
            &exact,
            1e-12,
        );
    }
}

pub(crate) fn decode_attention<B: Backend>(e: &mut Env<B>) {
    decode_case(e, &[1], (1, 1), 8);
    decode_case(e, &[3, 0, 17, 1, 64, 65, 127, 129], (4, 2), 16);
    decode_case(e, &[200, 5], (8, 1), 128);
    decode_case(e, &[33, 100], (8, 8), 64);
    decode_case(e, &[7, 70], (6, 2), 4);
    let lens: Vec<usize> = (0..40).map(|_| 1 + e.below(300)).collect();
    decode_case(e, &lens, (32, 8), 128);
    if e.big {
        decode_case(e, &[4096, 1, 2047], (32, 8), 128);
        decode_case(e, &[1000], (4, 1), 256);
    }
}
