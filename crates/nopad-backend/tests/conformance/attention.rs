//! Attention forward and backward: odd lengths (1, tile ± 1, an empty sequence), GQA groups of
//! 1, 2 and 4, head dims 8 to 128 (on CUDA in bf16, 64 and 128 take nopad-flash's kernels, the
//! others the simple ones), 500 short sequences, and on the GPU one of 4096; then sliding
//! windows of 1 to 1000 keys over the same kind of rows (on CUDA in bf16 nopad-flash's windowed
//! route; CUDA f32, whose simple kernels have no window, must refuse them).

use super::super::{say, Env};
use nopad_backend::prelude::*;

/// `cu_seqlens` and dims of packed sequences of `lens` with (H, Hkv, Dh) and `window`.
fn batch(
    lens: &[usize],
    (h, hkv, dh): (usize, usize, usize),
    window: Option<usize>,
) -> (Vec<i32>, AttnDims) {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    let dims = AttnDims {
        n: cu[lens.len()] as usize,
        n_seqs: lens.len(),
        max_seqlen: lens.iter().copied().max().unwrap_or(0),
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: dh,
        scale: 1.0 / (dh as f32).sqrt(),
        window,
    };
    (cu, dims)
}

/// Runs attention forward and backward on both sides for sequences of `lens`.
fn case<B: Backend>(
    e: &mut Env<B>,
    lens: &[usize],
    (h, hkv, dh): (usize, usize, usize),
    window: Option<usize>,
) {
    let (cu, dims) = batch(lens, (h, hkv, dh), window);
    let n = dims.n;
    let mut tag = if lens.len() > 8 {
        format!("{} seqs n={n} h={h}/{hkv} dh={dh}", lens.len())
    } else {
        format!("lens={lens:?} h={h}/{hkv} dh={dh}")
    };
    if let Some(w) = window {
        tag.push_str(&format!(" window={w}"));
    }
    let (wq, wo) = (n * dims.qkv_width(), n * dims.out_width());
    let qkv = e.randn(wq, 1.0, Kind::Compute);
    let dout = e.randn(wo, 1.0, Kind::Compute);
    let b = &e.b;
    let gcu = b.ints(&cu).unwrap();
    let gqkv = e.up(&qkv, Kind::Compute);
    let (mut gout, mut glse) = (e.poison(wo, Kind::Compute), e.poison(h * n, Kind::Master));
    b.attention_forward(AttnFwd {
        out: b.view_mut(&mut gout, 0..wo),
        lse: b.view_mut(&mut glse, 0..h * n),
        qkv: b.view(&gqkv, 0..wq),
        cu_seqlens: &gcu,
        dims,
    })
    .unwrap();
    let (mut out, mut lse) = (vec![0.0; wo], vec![0.0; h * n]);
    e.r.attention_forward(AttnFwd {
        out: &mut out,
        lse: &mut lse,
        qkv: &qkv,
        cu_seqlens: &cu,
        dims,
    })
    .unwrap();
    e.check(&format!("attention_fwd out {tag}"), &e.down(&gout), &out, 1);
    e.check(&format!("attention_fwd lse {tag}"), &e.down(&glse), &lse, 0);

    // The backward reads the reference forward's out and lse, as the backend stores them.
    let (out, lse) = (e.round(Kind::Compute, &out), e.round(Kind::Master, &lse));
    let (gdout, go, gl) = (
        e.up(&dout, Kind::Compute),
        e.up(&out, Kind::Compute),
        e.up(&lse, Kind::Master),
    );
    let mut gd = e.poison(wq, Kind::Compute);
    b.attention_backward(AttnBwd {
        d_qkv: b.view_mut(&mut gd, 0..wq),
        d_out: b.view(&gdout, 0..wo),
        qkv: b.view(&gqkv, 0..wq),
        out: b.view(&go, 0..wo),
        lse: b.view(&gl, 0..h * n),
        cu_seqlens: &gcu,
        dims,
    })
    .unwrap();
    let mut d = vec![0.0; wq];
    e.r.attention_backward(AttnBwd {
        d_qkv: &mut d,
        d_out: &dout,
        qkv: &qkv,
        out: &out,
        lse: &lse,
        cu_seqlens: &cu,
        dims,
    })
    .unwrap();
    e.check(&format!("attention_bwd d_qkv {tag}"), &e.down(&gd), &d, 1);
}

pub(crate) fn attention<B: Backend>(e: &mut Env<B>) {
    case(e, &[1], (1, 1, 8), None);
    case(e, &[3, 0, 17, 1, 64, 65, 127, 129], (4, 2, 16), None);
    case(e, &[70, 1, 200], (4, 1, 128), None);
    case(e, &[100, 33], (8, 2, 64), None);
    let lens: Vec<usize> = (0..500).map(|_| 1 + e.below(40)).collect();
    case(e, &lens, (2, 1, 32), None);
    if e.big {
        case(e, &[4096], (2, 1, 64), None);
    }
}

/// Sliding windows (head dims 64 and 128, where CUDA bf16 runs nopad-flash): edges inside a
/// 64-row tile, on its border and whole key tiles beyond it; packed short sequences longer than
/// the window; a window as long as the longest sequence (plain causal route).
pub(crate) fn attention_window<B: Backend>(e: &mut Env<B>) {
    /// Lengths, (H, Hkv, Dh), window.
    type Case = (&'static [usize], (usize, usize, usize), usize);
    let cases: &[Case] = &[
        (&[3, 0, 17, 1, 64, 65, 127, 129], (4, 2, 64), 16),
        (&[70, 1, 200], (4, 1, 128), 3),
        (&[100, 33], (8, 2, 64), 1),
        (&[70, 1, 200], (4, 1, 128), 64),
        (&[70, 1, 200], (4, 1, 128), 200),
    ];
    if e.name == "cuda f32" {
        // The simple kernels have no window: every case that hides a key is refused.
        for &(lens, shape, w) in &cases[..4] {
            refused(e, lens, shape, w);
        }
        say("cuda f32: windowed attention refused (nopad-flash runs it in bf16)");
        return;
    }
    for &(lens, shape, w) in cases {
        case(e, lens, shape, Some(w));
    }
    let lens: Vec<usize> = (0..300).map(|_| 1 + e.below(60)).collect();
    case(e, &lens, (2, 1, 64), Some(7));
    if e.big {
        case(e, &[4096, 700, 3], (2, 1, 128), Some(1000));
    }
}

/// A windowed call the backend has no kernel for must fail with an error that says so.
fn refused<B: Backend>(e: &mut Env<B>, lens: &[usize], shape: (usize, usize, usize), w: usize) {
    let (cu, dims) = batch(lens, shape, Some(w));
    let (n, h) = (dims.n, dims.n_heads);
    let b = &e.b;
    let gcu = b.ints(&cu).unwrap();
    let qkv = e.up(&vec![0.0; n * dims.qkv_width()], Kind::Compute);
    let mut out = e.poison(n * dims.out_width(), Kind::Compute);
    let mut lse = e.poison(h * n, Kind::Master);
    let err = b
        .attention_forward(AttnFwd {
            out: b.view_mut(&mut out, 0..n * dims.out_width()),
            lse: b.view_mut(&mut lse, 0..h * n),
            qkv: b.view(&qkv, 0..n * dims.qkv_width()),
            cu_seqlens: &gcu,
            dims,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("sliding window"), "{}: {err}", e.name);
}
