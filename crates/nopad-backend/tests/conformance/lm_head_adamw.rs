//! The fused output head with cross-entropy, and the AdamW update through the optimizer's
//! storage (split master weights where the backend keeps them).

use super::super::common::LmHeadCase;
use super::super::{Env, Store, TOL_F32};
use super::BOTH;
use nopad_backend::prelude::*;

pub(crate) fn lm_head<B: Backend>(e: &mut Env<B>) {
    // (n, d, v, fraction of rows without a target)
    for (n, d, v, masked) in [
        (1, 1, 2, 0.0),
        (37, 67, 131, 0.5),
        (300, 64, 1000, 0.3),
        (16, 8, 11, 1.0),
    ] {
        let x = e.randn(n * d, 1.0, Kind::Compute);
        let w = e.randn(v * d, 0.3, Kind::Compute);
        let case = LmHeadCase::new((n, d, v), x, w, &mut e.rng, masked);
        let (l0, dw0) = (
            e.randn(1, 1.0, Kind::Master),
            e.randn(v * d, 1.0, Kind::Grad),
        );
        let (x, w, targets, dims, scale) = (&case.x, &case.w, &case.targets, case.dims, case.scale);
        let b = &e.b;
        let (gx, gw) = (e.up(x, Kind::Compute), e.up(w, Kind::Compute));
        let gt = b.ints(targets).unwrap();
        // The backend's call; evaluation passes no gradient buffers.
        let run = |gl: &mut B::Buf, grads: Option<(&mut B::Buf, &mut B::Buf)>, write| {
            let (gdx, gdw) = grads.unzip();
            b.lm_head_loss(LmHeadLoss {
                loss_sum: b.view_mut(gl, 0..1),
                dx: gdx.map(|g| b.view_mut(g, 0..n * d)),
                d_w: gdw.map(|g| b.view_mut(g, 0..v * d)),
                x: b.view(&gx, 0..n * d),
                w: b.view(&gw, 0..v * d),
                targets: &gt,
                dims,
                grad_scale: scale,
                write,
            })
            .unwrap()
        };
        for acc in BOTH {
            let tag = format!("n={n} d={d} v={v} masked={masked} {acc:?}");
            let mut gl = e.up(&l0, Kind::Master);
            let mut gdx = e.poison(n * d, Kind::Compute);
            let mut gdw = e.grad_before(&dw0, acc);
            run(&mut gl, Some((&mut gdx, &mut gdw)), acc);
            let (l, dx, dw) = case.reference(&e.r, &l0, &dw0, acc);
            e.check(&format!("lm_head loss {tag}"), &e.down(&gl), &l, 0);
            // dlogits rounded, then the dx GEMM's output rounded.
            e.check(&format!("lm_head dx {tag}"), &e.down(&gdx), &dx, 2);
            e.check(&format!("lm_head dw {tag}"), &e.down(&gdw), &dw, 1 + e.gk());

            // Loss only (evaluation): no gradient touched.
            let mut gl = e.up(&l0, Kind::Master);
            run(&mut gl, None, acc);
            e.check(&format!("lm_head loss-only {tag}"), &e.down(&gl), &l, 0);
        }
    }
}

pub(crate) fn adamw<B: Backend>(e: &mut Env<B>) {
    // off = 1 shifts every view by one element (the unaligned kernels on CUDA).
    for (n, off) in [(1, 0), (1000, 0), (65_537, 0), (1003, 1)] {
        let hp = crate::optim::random_hp(e);
        // fp32 weights that bf16 cannot hold, so a split master must keep both halves.
        let p = e.randn(n, 1.0, Kind::Master);
        let g = e.randn(n, 1.0, Kind::Grad);
        let m: Vec<f64> = e.randn(n, 0.1, Kind::Master);
        let v: Vec<f64> = (0..n)
            .map(|_| e.rng.uniform() as f32 as f64 * 0.01)
            .collect();
        let v = e.round(Kind::Master, &v);
        let pad = |x: &[f64]| [vec![0.0; off], x.to_vec()].concat();
        let b = &e.b;
        let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
        let mut gp = e.up(&pad(&p), Kind::Compute);
        let mut gmaster = if b.needs_master() {
            let mut lo = b.master_new(&gp, n + off).unwrap();
            b.master_write(&mut gp, &mut lo, off, &p32).unwrap();
            let back = b.master_read(&gp, &lo, off..off + n).unwrap();
            assert!(
                back.iter()
                    .zip(&p32)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "master_write then master_read changed fp32 weights"
            );
            Some(lo)
        } else {
            None
        };
        let gg = e.up(&pad(&g), Kind::Grad);
        let (mut gm, mut gv) = (e.up(&pad(&m), Kind::Master), e.up(&pad(&v), Kind::Master));
        let r = off..off + n;
        b.adamw(AdamWStep {
            param: b.view_mut(&mut gp, r.clone()),
            master: gmaster.as_mut().map(|lo| b.view_mut(lo, r.clone())),
            grad: b.view(&gg, r.clone()),
            m: b.view_mut(&mut gm, r.clone()),
            v: b.view_mut(&mut gv, r.clone()),
            n,
            hp,
        })
        .unwrap();
        let (mut cp, mut cm, mut cv) = (p.clone(), m.clone(), v.clone());
        e.r.adamw(AdamWStep {
            param: &mut cp,
            master: None,
            grad: &g,
            m: &mut cm,
            v: &mut cv,
            n,
            hp,
        })
        .unwrap();
        // The change of the parameters is compared too (the update is ~1e-3 of them). Updated
        // f32 values carry rounding errors of up to 2^-24·|p| each, which relative to the change
        // is 2^-24·‖p‖/‖Δ‖; the tolerance of Δ includes twice that.
        let delta = |a: &[f64]| a.iter().zip(&p).map(|(x, y)| x - y).collect::<Vec<_>>();
        let norm = |a: &[f64]| a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dtol = match e.compute {
            Store::F64 => e.tol(0),
            _ => TOL_F32 + 2.0 * 2f64.powi(-24) * norm(&p) / norm(&delta(&cp)).max(1e-30),
        };
        let updated = match &gmaster {
            Some(lo) => {
                e.check(&format!("adamw param n={n}"), &e.down(&gp)[off..], &cp, 1);
                let w = b.master_read(&gp, lo, r.clone()).unwrap();
                w.into_iter().map(f64::from).collect()
            }
            None => e.down(&gp)[off..].to_vec(),
        };
        e.check(&format!("adamw fp32 weights n={n}"), &updated, &cp, 0);
        let what = format!("adamw weight delta n={n}");
        e.check_tol(&what, &delta(&updated), &delta(&cp), dtol);
        // m' = β1·m + (1-β1)·g can cancel: the f32 error of a sum is relative to the sum of its
        // terms' magnitudes, not to the result, so the bound scales by ‖|β1·m|+|(1-β1)·g|‖/‖m'‖
        // (one element that nearly cancels would otherwise fail a correct kernel).
        let b1 = hp.beta1 as f64;
        let terms: Vec<f64> = m
            .iter()
            .zip(&g)
            .map(|(m, g)| (b1 * m).abs() + ((1.0 - b1) * g).abs())
            .collect();
        let mtol = match e.compute {
            Store::F64 => e.tol(0),
            _ => TOL_F32 + 2.0 * 2f64.powi(-24) * norm(&terms) / norm(&cm).max(1e-30),
        };
        e.check_tol(&format!("adamw m n={n}"), &e.down(&gm)[off..], &cm, mtol);
        e.check(&format!("adamw v n={n}"), &e.down(&gv)[off..], &cv, 0);
    }
}
