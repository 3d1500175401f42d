//! Attention forward and backward, CUDA vs CPU: odd lengths (1, tile ± 1, an empty sequence),
//! GQA groups of 1, 2, 4, head dims 8 to 128, 500 short sequences and one of 4096.

use super::{bf16_round, envs, Env};
use nopad_backend::cuda::CudaDtype;
use nopad_backend::prelude::*;
use nopad_backend::{AttnDims, Kind};

/// Runs attention forward and backward on both backends for sequences of `lens`.
fn attention_case(e: &mut Env, lens: &[usize], h: usize, hkv: usize, dh: usize) {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    let n = *cu.last().expect("cu has an entry") as usize;
    let dims = AttnDims {
        n,
        n_seqs: lens.len(),
        max_seqlen: lens.iter().copied().max().unwrap_or(0),
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: dh,
        scale: 1.0 / (dh as f32).sqrt(),
    };
    let long = lens.len() > 3 || n > 1000;
    let tag = if long {
        format!("{} seqs n={n} h={h}/{hkv} dh={dh}", lens.len())
    } else {
        format!("lens={lens:?} h={h}/{hkv} dh={dh}")
    };
    let qkv = e.randn(n * dims.qkv_width(), 1.0);
    let gcu = e.gpu.ints(&cu).unwrap();
    let gqkv = e.up(&qkv, Kind::Compute);
    let mut gout = e.poison(n * dims.out_width(), Kind::Compute);
    let mut glse = e.poison(h * n, Kind::Master);
    e.gpu
        .attention_forward(AttnFwd {
            out: gout.as_mut(),
            lse: glse.as_mut(),
            qkv: gqkv.as_ref(),
            cu_seqlens: &gcu,
            dims,
        })
        .unwrap();
    let (mut out, mut lse) = (vec![0f32; n * dims.out_width()], vec![0f32; h * n]);
    e.cpu
        .attention_forward(AttnFwd {
            out: &mut out,
            lse: &mut lse,
            qkv: &qkv,
            cu_seqlens: &cu,
            dims,
        })
        .unwrap();
    e.check(&format!("attention_fwd out {tag}"), &e.down(&gout), &out, 1);
    e.check(&format!("attention_fwd lse {tag}"), &e.down(&glse), &lse, 0);

    // The backward reads the CPU forward's out (rounded to the Compute type) and lse on both sides.
    let bf = e.mode == CudaDtype::Bf16;
    let out_c: Vec<f32> = out
        .iter()
        .map(|&x| if bf { bf16_round(x) } else { x })
        .collect();
    let dout = e.randn(n * dims.out_width(), 1.0);
    let (gdout, go, gl) = (
        e.up(&dout, Kind::Compute),
        e.up(&out_c, Kind::Compute),
        e.up(&lse, Kind::Master),
    );
    let mut gd = e.poison(n * dims.qkv_width(), Kind::Compute);
    e.gpu
        .attention_backward(AttnBwd {
            d_qkv: gd.as_mut(),
            d_out: gdout.as_ref(),
            qkv: gqkv.as_ref(),
            out: go.as_ref(),
            lse: gl.as_ref(),
            cu_seqlens: &gcu,
            dims,
        })
        .unwrap();
    let mut d = vec![0f32; n * dims.qkv_width()];
    e.cpu
        .attention_backward(AttnBwd {
            d_qkv: &mut d,
            d_out: &dout,
            qkv: &qkv,
            out: &out_c,
            lse: &lse,
            cu_seqlens: &cu,
            dims,
        })
        .unwrap();
    e.check(&format!("attention_bwd d_qkv {tag}"), &e.down(&gd), &d, 1);
}

#[test]
fn attention_short_and_odd_lengths() {
    let Some(envs) = envs("attention") else {
        return;
    };
    for mut e in envs {
        attention_case(&mut e, &[1], 1, 1, 8);
        attention_case(&mut e, &[3, 0, 17, 1, 64, 65, 127, 129], 4, 2, 16);
        attention_case(&mut e, &[70, 1, 200], 4, 1, 128);
        attention_case(&mut e, &[100, 33], 8, 2, 64);
        let lens: Vec<usize> = (0..500).map(|_| 1 + e.below(40)).collect();
        attention_case(&mut e, &lens, 2, 1, 32);
    }
}

#[test]
fn attention_long_sequence() {
    let Some(envs) = envs("attention_long") else {
        return;
    };
    for mut e in envs {
        attention_case(&mut e, &[4096], 2, 1, 64);
    }
}
