//! The test bodies of generation's ops: `copy_rows` (a KV cache's append: rows scattered to
//! chosen destinations, the others untouched, bit for bit) and `decode_attention` (one query per
//! sequence over its span of a cache: spans out of order and with gaps, lengths 1, a chunk ± 1
//! and several chunks, a sequence with no key, GQA groups of 1 to 8, head dims 4 to 256).

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

/// Decode attention of sequences of `lens` (spans laid out in reverse order with gaps).
fn decode_case<B: Backend>(e: &mut Env<B>, lens: &[usize], h: usize, hkv: usize, dh: usize) {
    let dims = DecodeDims {
        n_seqs: lens.len(),
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: dh,
        scale: 1.0 / (dh as f32).sqrt(),
    };
    let mut spans = vec![0i32; 2 * lens.len()];
    let mut at = 1;
    for (s, &l) in lens.iter().enumerate().rev() {
        spans[2 * s..2 * s + 2].copy_from_slice(&[at, l as i32]);
        at += l as i32 + 1;
    }
    let rows = at as usize;
    let tag = format!("lens={lens:?} h={h}/{hkv} dh={dh}");
    let (wq, wc, wo) = (
        lens.len() * dims.qkv_width(),
        rows * dims.cache_width(),
        lens.len() * dims.out_width(),
    );
    let qkv = e.randn(wq, 1.0, Kind::Compute);
    let cache = e.randn(wc, 1.0, Kind::Compute);
    let b = &e.b;
    let (gq, gc, gs) = (
        e.up(&qkv, Kind::Compute),
        e.up(&cache, Kind::Compute),
        b.ints(&spans).unwrap(),
    );
    let mut gout = e.poison(wo, Kind::Compute);
    b.decode_attention(DecodeAttn {
        out: b.view_mut(&mut gout, 0..wo),
        qkv: b.view(&gq, 0..wq),
        cache: b.view(&gc, 0..wc),
        spans: &gs,
        dims,
    })
    .unwrap();
    let mut out = vec![0.0; wo];
    e.r.decode_attention(DecodeAttn {
        out: &mut out,
        qkv: &qkv,
        cache: &cache,
        spans: &spans,
        dims,
    })
    .unwrap();
    e.check(&format!("decode_attention {tag}"), &e.down(&gout), &out, 1);
}

pub(crate) fn decode_attention<B: Backend>(e: &mut Env<B>) {
    decode_case(e, &[1], 1, 1, 8);
    decode_case(e, &[3, 0, 17, 1, 64, 65, 127, 129], 4, 2, 16);
    decode_case(e, &[200, 5], 8, 1, 128);
    decode_case(e, &[33, 100], 8, 8, 64);
    decode_case(e, &[7, 70], 6, 2, 4);
    let lens: Vec<usize> = (0..40).map(|_| 1 + e.below(300)).collect();
    decode_case(e, &lens, 32, 8, 128);
    if e.big {
        decode_case(e, &[4096, 1, 2047], 32, 8, 128);
        decode_case(e, &[1000], 4, 1, 256);
    }
}
