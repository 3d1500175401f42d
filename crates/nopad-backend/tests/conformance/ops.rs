//! The test bodies of the conformance suite, one per op family, generic over the backend. Each
//! runs the op on `e.b` and on the reference `e.r` (`Cpu<f64>`) with the same values and compares
//! (see `conformance.rs`).

use super::Env;
use nopad_backend::prelude::*;

const BOTH: [GradWrite; 2] = [GradWrite::Overwrite, GradWrite::Accumulate];

/// `add`, `add_assign`, `scale` and `sum_squares`; `add` must not write past `n`.
pub(crate) fn elementwise<B: Backend>(e: &mut Env<B>) {
    for n in [1, 7, 1024, 1031, 100_003] {
        let (a, b2, o) = (
            e.randn(n, 1.0, Kind::Compute),
            e.randn(n, 1.0, Kind::Compute),
            e.randn(n, 1.0, Kind::Compute),
        );
        let (ga, gb) = (e.up(&a, Kind::Compute), e.up(&b2, Kind::Compute));
        let b = &e.b;
        let mut gout = e.poison(n + 3, Kind::Compute);
        b.add(
            b.view_mut(&mut gout, 0..n + 3),
            b.view(&ga, 0..n),
            b.view(&gb, 0..n),
            n,
        )
        .unwrap();
        let mut want = vec![0.0; n];
        e.r.add(&mut want, &a, &b2, n).unwrap();
        let got = e.down(&gout);
        e.check(&format!("add n={n}"), &got[..n], &want, 1);
        assert!(got[n..].iter().all(|x| x.is_nan()), "add wrote past n");

        let mut gacc = e.up(&o, Kind::Compute);
        b.add_assign(b.view_mut(&mut gacc, 0..n), b.view(&ga, 0..n), n)
            .unwrap();
        let mut want = o.clone();
        e.r.add_assign(&mut want, &a, n).unwrap();
        e.check(&format!("add_assign n={n}"), &e.down(&gacc), &want, 1);

        let mut gs = e.up(&o, Kind::Compute);
        b.scale(b.view_mut(&mut gs, 0..n), 0.37, n).unwrap();
        let mut want = o.clone();
        e.r.scale(&mut want, 0.37, n).unwrap();
        e.check(&format!("scale n={n}"), &e.down(&gs), &want, 1);

        let gm = e.up(&a, Kind::Master);
        for (name, buf) in [("compute", &ga), ("master", &gm)] {
            let got = b.sum_squares(b.view(buf, 0..n), n).unwrap();
            let want = e.r.sum_squares(&a, n).unwrap();
            e.check(&format!("sum_squares {name} n={n}"), &[got], &[want], 0);
        }
    }
}

pub(crate) fn embedding<B: Backend>(e: &mut Env<B>) {
    for (n, v, d) in [(1, 1, 1), (37, 11, 13), (300, 97, 67)] {
        let tag = format!("n={n} v={v} d={d}");
        let table = e.randn(v * d, 1.0, Kind::Compute);
        let tokens: Vec<i32> = (0..n).map(|_| e.below(v) as i32).collect();
        let (dx, acc) = (
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(v * d, 1.0, Kind::Grad),
        );
        let (b, gt) = (&e.b, e.b.ints(&tokens).unwrap());
        let gtab = e.up(&table, Kind::Compute);
        let mut gx = e.poison(n * d, Kind::Compute);
        b.embedding_forward(EmbeddingFwd {
            x: b.view_mut(&mut gx, 0..n * d),
            table: b.view(&gtab, 0..v * d),
            tokens: &gt,
            n,
            d,
        })
        .unwrap();
        let mut want = vec![0.0; n * d];
        e.r.embedding_forward(EmbeddingFwd {
            x: &mut want,
            table: &table,
            tokens: &tokens,
            n,
            d,
        })
        .unwrap();
        e.check(&format!("embedding_fwd {tag}"), &e.down(&gx), &want, 0);

        let gdx = e.up(&dx, Kind::Compute);
        let mut gdt = e.up(&acc, Kind::Grad);
        b.embedding_backward(EmbeddingBwd {
            d_table: b.view_mut(&mut gdt, 0..v * d),
            dx: b.view(&gdx, 0..n * d),
            tokens: &gt,
            n,
            d,
        })
        .unwrap();
        let mut want = acc.clone();
        e.r.embedding_backward(EmbeddingBwd {
            d_table: &mut want,
            dx: &dx,
            tokens: &tokens,
            n,
            d,
        })
        .unwrap();
        e.check(
            &format!("embedding_bwd {tag}"),
            &e.down(&gdt),
            &want,
            e.gk(),
        );
    }
}

pub(crate) fn linear<B: Backend>(e: &mut Env<B>) {
    for (n, d_in, d_out, bias) in [
        (1, 1, 1, false),
        (1, 3, 5, true),
        (37, 67, 131, true),
        (131, 256, 97, false),
        (509, 64, 320, true),
    ] {
        let dims = LinearDims { n, d_in, d_out };
        let tag = format!("n={n} in={d_in} out={d_out} bias={bias}");
        let x = e.randn(n * d_in, 1.0, Kind::Compute);
        let w = e.randn(d_out * d_in, 0.1, Kind::Compute);
        let bv = e.randn(d_out, 1.0, Kind::Compute);
        let dy = e.randn(n * d_out, 1.0, Kind::Compute);
        let (dw0, db0) = (
            e.randn(d_out * d_in, 1.0, Kind::Grad),
            e.randn(d_out, 1.0, Kind::Grad),
        );
        let b = &e.b;
        let (gx, gw, gb) = (
            e.up(&x, Kind::Compute),
            e.up(&w, Kind::Compute),
            e.up(&bv, Kind::Compute),
        );
        let mut gy = e.poison(n * d_out, Kind::Compute);
        b.linear_forward(LinearFwd {
            y: b.view_mut(&mut gy, 0..n * d_out),
            x: b.view(&gx, 0..n * d_in),
            w: b.view(&gw, 0..d_out * d_in),
            b: bias.then(|| b.view(&gb, 0..d_out)),
            dims,
        })
        .unwrap();
        let mut y = vec![0.0; n * d_out];
        e.r.linear_forward(LinearFwd {
            y: &mut y,
            x: &x,
            w: &w,
            b: bias.then_some(&bv[..]),
            dims,
        })
        .unwrap();
        // The GEMM's output rounded, then the bias add rounded again.
        e.check(
            &format!("linear_fwd {tag}"),
            &e.down(&gy),
            &y,
            1 + bias as u32,
        );

        let gdy = e.up(&dy, Kind::Compute);
        for acc in BOTH {
            let tag = format!("{tag} {acc:?}");
            let mut gdx = e.poison(n * d_in, Kind::Compute);
            let (mut gdw, mut gdb) = (e.grad_before(&dw0, acc), e.grad_before(&db0, acc));
            b.linear_backward(LinearBwd {
                dx: Some(b.view_mut(&mut gdx, 0..n * d_in)),
                dx_write: GradWrite::Overwrite,
                d_w: Some(b.view_mut(&mut gdw, 0..d_out * d_in)),
                d_b: bias.then(|| b.view_mut(&mut gdb, 0..d_out)),
                dy: b.view(&gdy, 0..n * d_out),
                x: b.view(&gx, 0..n * d_in),
                w: b.view(&gw, 0..d_out * d_in),
                dims,
                write: acc,
            })
            .unwrap();
            let (mut dx, mut dw, mut db) = (vec![0.0; n * d_in], dw0.clone(), db0.clone());
            e.r.linear_backward(LinearBwd {
                dx: Some(&mut dx),
                dx_write: GradWrite::Overwrite,
                d_w: Some(&mut dw),
                d_b: bias.then_some(&mut db[..]),
                dy: &dy,
                x: &x,
                w: &w,
                dims,
                write: acc,
            })
            .unwrap();
            e.check(&format!("linear_bwd dx {tag}"), &e.down(&gdx), &dx, 1);
            e.check(&format!("linear_bwd dw {tag}"), &e.down(&gdw), &dw, e.gk());
            if bias {
                e.check(&format!("linear_bwd db {tag}"), &e.down(&gdb), &db, e.gk());
            }
        }
    }
}

/// The LoRA seam of `linear_backward`: a frozen weight (no `d_w`, no `d_b`) computes only `dx`;
/// an adapter path adds its `dx` onto what the base layer wrote (`dx_write: Accumulate`).
pub(crate) fn linear_frozen_and_adapter<B: Backend>(e: &mut Env<B>) {
    for (n, d_in, d_out) in [(1, 1, 1), (37, 67, 131), (131, 256, 97), (0, 5, 3)] {
        let dims = LinearDims { n, d_in, d_out };
        let x = e.randn(n * d_in, 1.0, Kind::Compute);
        let w = e.randn(d_out * d_in, 0.1, Kind::Compute);
        let dy = e.randn(n * d_out, 1.0, Kind::Compute);
        let dx0 = e.randn(n * d_in, 1.0, Kind::Compute);
        let (gx, gw, gdy) = (
            e.up(&x, Kind::Compute),
            e.up(&w, Kind::Compute),
            e.up(&dy, Kind::Compute),
        );
        for dx_write in BOTH {
            let tag = format!("n={n} in={d_in} out={d_out} dx {dx_write:?}");
            let b = &e.b;
            let mut gdx = match dx_write {
                GradWrite::Overwrite => e.poison(n * d_in, Kind::Compute),
                GradWrite::Accumulate => e.up(&dx0, Kind::Compute),
            };
            b.linear_backward(LinearBwd {
                dx: Some(b.view_mut(&mut gdx, 0..n * d_in)),
                dx_write,
                d_w: None,
                d_b: None,
                dy: b.view(&gdy, 0..n * d_out),
                x: b.view(&gx, 0..n * d_in),
                w: b.view(&gw, 0..d_out * d_in),
                dims,
                write: GradWrite::Overwrite,
            })
            .unwrap();
            // The reference: the plain dx, added by hand when accumulating.
            let mut want = vec![0.0; n * d_in];
            let mut dw = vec![0.0; d_out * d_in];
            e.r.linear_backward(LinearBwd {
                dx: Some(&mut want),
                dx_write: GradWrite::Overwrite,
                d_w: Some(&mut dw),
                d_b: None,
                dy: &dy,
                x: &x,
                w: &w,
                dims,
                write: GradWrite::Overwrite,
            })
            .unwrap();
            if dx_write == GradWrite::Accumulate {
                want.iter_mut().zip(&dx0).for_each(|(a, b)| *a += b);
            }
            e.check(&format!("linear_bwd frozen {tag}"), &e.down(&gdx), &want, 1);
        }
    }
}

pub(crate) fn rmsnorm<B: Backend>(e: &mut Env<B>) {
    let mut cases = vec![(1, 1), (7, 13), (131, 2048), (1000, 67), (9, 2056)];
    if e.big {
        cases.extend([(3000, 256), (517, 4096)]);
    }
    for (n, d) in cases {
        let tag = format!("n={n} d={d}");
        let (x, w, r) = (
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(d, 1.0, Kind::Compute),
            e.randn(n * d, 1.0, Kind::Compute),
        );
        let (dy, dx0, dw0) = (
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(d, 1.0, Kind::Grad),
        );
        let b = &e.b;
        let (gx, gw, gr) = (
            e.up(&x, Kind::Compute),
            e.up(&w, Kind::Compute),
            e.up(&r, Kind::Compute),
        );
        let (mut gy, mut grstd) = (e.poison(n * d, Kind::Compute), e.poison(n, Kind::Master));
        b.rmsnorm_forward(RmsNormFwd {
            y: b.view_mut(&mut gy, 0..n * d),
            rstd: b.view_mut(&mut grstd, 0..n),
            x: b.view(&gx, 0..n * d),
            weight: b.view(&gw, 0..d),
            n,
            d,
            eps: 1e-5,
        })
        .unwrap();
        let (mut y, mut rstd) = (vec![0.0; n * d], vec![0.0; n]);
        e.r.rmsnorm_forward(RmsNormFwd {
            y: &mut y,
            rstd: &mut rstd,
            x: &x,
            weight: &w,
            n,
            d,
            eps: 1e-5,
        })
        .unwrap();
        e.check(&format!("rmsnorm_fwd y {tag}"), &e.down(&gy), &y, 1);
        e.check(
            &format!("rmsnorm_fwd rstd {tag}"),
            &e.down(&grstd),
            &rstd,
            0,
        );

        // The residual add fused with the norm: the sum is rounded to the Compute type first,
        // one more rounding on every output.
        let mut gxs = e.up(&x, Kind::Compute);
        let (mut gy2, mut grstd2) = (e.poison(n * d, Kind::Compute), e.poison(n, Kind::Master));
        b.add_rmsnorm_forward(AddRmsNormFwd {
            y: b.view_mut(&mut gy2, 0..n * d),
            rstd: b.view_mut(&mut grstd2, 0..n),
            x: b.view_mut(&mut gxs, 0..n * d),
            r: b.view(&gr, 0..n * d),
            weight: b.view(&gw, 0..d),
            n,
            d,
            eps: 1e-5,
        })
        .unwrap();
        let (mut xs, mut y2, mut rstd2) = (x.clone(), vec![0.0; n * d], vec![0.0; n]);
        e.r.add_rmsnorm_forward(AddRmsNormFwd {
            y: &mut y2,
            rstd: &mut rstd2,
            x: &mut xs,
            r: &r,
            weight: &w,
            n,
            d,
            eps: 1e-5,
        })
        .unwrap();
        e.check(&format!("add_rmsnorm x+r {tag}"), &e.down(&gxs), &xs, 1);
        e.check(&format!("add_rmsnorm y {tag}"), &e.down(&gy2), &y2, 2);
        e.check(
            &format!("add_rmsnorm rstd {tag}"),
            &e.down(&grstd2),
            &rstd2,
            1,
        );

        // The backward reads the reference's rstd (as the backend stores it) on both sides.
        let rs = e.round(Kind::Master, &rstd);
        let (gdy, grs) = (e.up(&dy, Kind::Compute), e.up(&rs, Kind::Master));
        for acc in BOTH {
            let tag = format!("{tag} {acc:?}");
            let (mut gdx, mut gdw) = (e.up(&dx0, Kind::Compute), e.grad_before(&dw0, acc));
            b.rmsnorm_backward(RmsNormBwd {
                dx: b.view_mut(&mut gdx, 0..n * d),
                d_weight: Some(b.view_mut(&mut gdw, 0..d)),
                dy: b.view(&gdy, 0..n * d),
                x: b.view(&gx, 0..n * d),
                weight: b.view(&gw, 0..d),
                rstd: b.view(&grs, 0..n),
                n,
                d,
                write: acc,
            })
            .unwrap();
            let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
            e.r.rmsnorm_backward(RmsNormBwd {
                dx: &mut dx,
                d_weight: Some(&mut dw),
                dy: &dy,
                x: &x,
                weight: &w,
                rstd: &rs,
                n,
                d,
                write: acc,
            })
            .unwrap();
            e.check(&format!("rmsnorm_bwd dx(+=) {tag}"), &e.down(&gdx), &dx, 1);
            e.check(&format!("rmsnorm_bwd dw {tag}"), &e.down(&gdw), &dw, e.gk());
        }
    }
}

/// The per-head norm of Qwen3's q_norm/k_norm over a packed qkv buffer: head dims 64 and 128
/// (and odd small ones), GQA and MHA; the value heads must come back untouched, and frozen
/// weights must leave dx bit for bit as it is with a weight gradient.
pub(crate) fn head_rmsnorm<B: Backend>(e: &mut Env<B>) {
    let mut cases = vec![(1, 1, 1, 2), (7, 3, 1, 64), (37, 4, 2, 128), (5, 2, 2, 30)];
    if e.big {
        cases.extend([(3000, 16, 8, 128), (517, 14, 2, 64), (1031, 32, 8, 128)]);
    }
    for (n, heads, kv_heads, head_dim) in cases {
        let dims = HeadNormDims {
            n,
            heads,
            kv_heads,
            head_dim,
        };
        let (w, xl, hn) = (
            n * dims.row_stride(),
            n * dims.normed_heads() * head_dim,
            n * dims.normed_heads(),
        );
        let tag = format!("n={n} h={heads} kv={kv_heads} dh={head_dim}");
        let [qkv, wt, dy] = [w, 2 * head_dim, w].map(|len| e.randn(len, 1.0, Kind::Compute));
        let dw0 = e.randn(2 * head_dim, 1.0, Kind::Grad);
        let b = &e.b;
        let (mut gq, gw) = (e.up(&qkv, Kind::Compute), e.up(&wt, Kind::Compute));
        let (mut gx, mut grs) = (e.poison(xl, Kind::Compute), e.poison(hn, Kind::Master));
        b.head_rmsnorm_forward(HeadRmsNormFwd {
            qkv: b.view_mut(&mut gq, 0..w),
            x: b.view_mut(&mut gx, 0..xl),
            rstd: b.view_mut(&mut grs, 0..hn),
            weight: b.view(&gw, 0..2 * head_dim),
            dims,
            eps: 1e-6,
        })
        .unwrap();
        let (mut y, mut x, mut rstd) = (qkv.clone(), vec![0.0; xl], vec![0.0; hn]);
        e.r.head_rmsnorm_forward(HeadRmsNormFwd {
            qkv: &mut y,
            x: &mut x,
            rstd: &mut rstd,
            weight: &wt,
            dims,
            eps: 1e-6,
        })
        .unwrap();
        e.check(&format!("head_rmsnorm_fwd qkv {tag}"), &e.down(&gq), &y, 1);
        e.check(&format!("head_rmsnorm_fwd x {tag}"), &e.down(&gx), &x, 0);
        e.check(
            &format!("head_rmsnorm_fwd rstd {tag}"),
            &e.down(&grs),
            &rstd,
            0,
        );

        // The backward reads the reference's rstd (as the backend stores it) on both sides.
        let rs = e.round(Kind::Master, &rstd);
        let grs = e.up(&rs, Kind::Master);
        let mut dxs = Vec::new();
        for (acc, frozen) in [
            (GradWrite::Overwrite, false),
            (GradWrite::Accumulate, false),
            (GradWrite::Overwrite, true),
        ] {
            let tag = format!("{tag} {acc:?}");
            let (mut gd, mut gdw) = (e.up(&dy, Kind::Compute), e.grad_before(&dw0, acc));
            b.head_rmsnorm_backward(HeadRmsNormBwd {
                d_qkv: b.view_mut(&mut gd, 0..w),
                d_weight: (!frozen).then(|| b.view_mut(&mut gdw, 0..2 * head_dim)),
                x: b.view(&gx, 0..xl),
                rstd: b.view(&grs, 0..hn),
                weight: b.view(&gw, 0..2 * head_dim),
                dims,
                write: acc,
            })
            .unwrap();
            dxs.push(e.down(&gd));
            if frozen {
                break;
            }
            let (mut dx, mut dw) = (dy.clone(), dw0.clone());
            e.r.head_rmsnorm_backward(HeadRmsNormBwd {
                d_qkv: &mut dx,
                d_weight: Some(&mut dw),
                x: &x,
                rstd: &rs,
                weight: &wt,
                dims,
                write: acc,
            })
            .unwrap();
            e.check(
                &format!("head_rmsnorm_bwd dx {tag}"),
                &dxs[dxs.len() - 1],
                &dx,
                1,
            );
            e.check(
                &format!("head_rmsnorm_bwd dw {tag}"),
                &e.down(&gdw),
                &dw,
                e.gk(),
            );
        }
        // Frozen weights: exactly the same dx.
        e.check_tol(
            &format!("head_rmsnorm_bwd frozen {tag}"),
            &dxs[2],
            &dxs[0],
            0.0,
        );
    }
}

pub(crate) fn rope<B: Backend>(e: &mut Env<B>) {
    for (n, heads, rot, dh) in [(1, 1, 1, 2), (37, 5, 3, 16), (300, 48, 40, 64)] {
        let dims = RopeDims {
            n,
            row_stride: heads * dh,
            n_rot_heads: rot,
            head_dim: dh,
        };
        let len = n * heads * dh;
        let x = e.randn(len, 1.0, Kind::Compute);
        let inv: Vec<f64> = (0..dh / 2)
            .map(|i| 500_000f32.powf(-2.0 * i as f32 / dh as f32) as f64)
            .collect();
        let pos: Vec<i32> = (0..n).map(|_| e.below(5000) as i32).collect();
        let b = &e.b;
        let (gpos, ginv) = (b.ints(&pos).unwrap(), e.up(&inv, Kind::Master));
        for backward in [false, true] {
            let mut gx = e.up(&x, Kind::Compute);
            let a = Rope {
                x: b.view_mut(&mut gx, 0..len),
                inv_freq: b.view(&ginv, 0..dh / 2),
                positions: &gpos,
                dims,
            };
            let mut want = x.clone();
            let r = Rope {
                x: &mut want[..],
                inv_freq: &inv[..],
                positions: &pos,
                dims,
            };
            if backward {
                b.rope_backward(a).unwrap();
                e.r.rope_backward(r).unwrap();
            } else {
                b.rope_forward(a).unwrap();
                e.r.rope_forward(r).unwrap();
            }
            let what = if backward { "rope_bwd" } else { "rope_fwd" };
            let tag = format!("{what} n={n} rot={rot} dh={dh}");
            e.check(&tag, &e.down(&gx), &want, 1);
        }
    }
}

pub(crate) fn swiglu<B: Backend>(e: &mut Env<B>) {
    for (n, f) in [(1, 1), (13, 37), (257, 1000)] {
        let tag = format!("n={n} f={f}");
        let (gu, da) = (
            e.randn(2 * n * f, 2.0, Kind::Compute),
            e.randn(n * f, 1.0, Kind::Compute),
        );
        let b = &e.b;
        let (mut ggu, gda) = (e.up(&gu, Kind::Compute), e.up(&da, Kind::Compute));
        let mut ga = e.poison(n * f, Kind::Compute);
        b.swiglu_forward(SwigluFwd {
            a: b.view_mut(&mut ga, 0..n * f),
            gu: b.view(&ggu, 0..2 * n * f),
            n,
            f,
        })
        .unwrap();
        let mut a = vec![0.0; n * f];
        e.r.swiglu_forward(SwigluFwd {
            a: &mut a,
            gu: &gu,
            n,
            f,
        })
        .unwrap();
        e.check(&format!("swiglu_fwd {tag}"), &e.down(&ga), &a, 1);
        b.swiglu_backward(SwigluBwd {
            gu: b.view_mut(&mut ggu, 0..2 * n * f),
            d_a: b.view(&gda, 0..n * f),
            n,
            f,
        })
        .unwrap();
        let mut dgu = gu.clone();
        e.r.swiglu_backward(SwigluBwd {
            gu: &mut dgu,
            d_a: &da,
            n,
            f,
        })
        .unwrap();
        e.check(&format!("swiglu_bwd {tag}"), &e.down(&ggu), &dgu, 1);
    }
}

#[path = "attention.rs"]
mod attention_body;
pub(crate) use attention_body::{attention, attention_window};
#[path = "lm_head_adamw.rs"]
mod lm_head_adamw;
pub(crate) use lm_head_adamw::{adamw, lm_head};
