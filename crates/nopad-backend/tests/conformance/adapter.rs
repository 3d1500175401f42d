//! The test bodies of the ops low-rank adapters add: `add_columns`, `gather_columns`, seeded
//! `dropout` (the same mask on every backend, regenerated from the seed), and RMSNorm's backward
//! over a frozen weight (`d_weight: None`).

use super::Env;
use nopad_backend::prelude::*;

/// Scatter into and gather from columns of a wider matrix, including its first and last ones;
/// the columns outside the window must be left untouched.
pub(crate) fn adapter_columns<B: Backend>(e: &mut Env<B>) {
    for (n, stride, c0, w) in [
        (1, 1, 0, 1),
        (37, 29, 0, 29),
        (37, 29, 5, 11),
        (300, 96, 80, 16),
    ] {
        let tag = format!("n={n} stride={stride} c0={c0} w={w}");
        let (y0, x) = (
            e.randn(n * stride, 1.0, Kind::Compute),
            e.randn(n * w, 1.0, Kind::Compute),
        );
        let b = &e.b;
        let (mut gy, gx) = (e.up(&y0, Kind::Compute), e.up(&x, Kind::Compute));
        b.add_columns(AddColumns {
            y: b.view_mut(&mut gy, 0..n * stride),
            x: b.view(&gx, 0..n * w),
            n,
            stride,
            c0,
            w,
            s: 0.75,
        })
        .unwrap();
        let mut want = y0.clone();
        e.r.add_columns(AddColumns {
            y: &mut want,
            x: &x,
            n,
            stride,
            c0,
            w,
            s: 0.75,
        })
        .unwrap();
        let got = e.down(&gy);
        e.check(&format!("add_columns {tag}"), &got, &want, 1);
        for t in 0..n {
            for j in (0..stride).filter(|j| !(c0..c0 + w).contains(j)) {
                assert_eq!(got[t * stride + j], y0[t * stride + j], "{tag}: column {j}");
            }
        }
        // Naive formula on the reference.
        let i = (n - 1) * stride + c0 + w - 1;
        assert!(
            (want[i] - y0[i] - 0.75 * x[n * w - 1]).abs() < 1e-12,
            "{tag}"
        );

        let gy0 = e.up(&y0, Kind::Compute);
        let mut gt = e.poison(n * w, Kind::Compute);
        b.gather_columns(GatherColumns {
            y: b.view_mut(&mut gt, 0..n * w),
            x: b.view(&gy0, 0..n * stride),
            n,
            stride,
            c0,
            w,
            s: -1.5,
        })
        .unwrap();
        let want: Vec<f64> = (0..n * w)
            .map(|i| -1.5 * y0[(i / w) * stride + c0 + i % w])
            .collect();
        e.check(&format!("gather_columns {tag}"), &e.down(&gt), &want, 1);
    }
    // A window past the row is refused.
    let b = &e.b;
    let (mut gy, gx) = (e.poison(8, Kind::Compute), e.poison(8, Kind::Compute));
    let r = b.add_columns(AddColumns {
        y: b.view_mut(&mut gy, 0..8),
        x: b.view(&gx, 0..8),
        n: 2,
        stride: 4,
        c0: 1,
        w: 4,
        s: 1.0,
    });
    assert!(r.is_err(), "columns 1..5 of a row of 4");
}

/// The mask depends only on (seed, index): the backend agrees with the reference element for
/// element, `Accumulate` adds the masked values, another seed draws another mask, and about a
/// fraction p is dropped.
pub(crate) fn dropout<B: Backend>(e: &mut Env<B>) {
    for (n, p) in [(1, 0.5f32), (1031, 0.1), (100_003, 0.3), (4096, 0.0)] {
        let tag = format!("n={n} p={p}");
        let (x, y0) = (
            e.randn(n, 1.0, Kind::Compute),
            e.randn(n, 1.0, Kind::Compute),
        );
        let b = &e.b;
        let gx = e.up(&x, Kind::Compute);
        let mut masks = Vec::new();
        for (write, seed) in [
            (GradWrite::Overwrite, 7u64),
            (GradWrite::Accumulate, 7),
            (GradWrite::Overwrite, 8),
        ] {
            let mut gy = match write {
                GradWrite::Overwrite => e.poison(n, Kind::Compute),
                GradWrite::Accumulate => e.up(&y0, Kind::Compute),
            };
            b.dropout(Dropout {
                y: b.view_mut(&mut gy, 0..n),
                x: b.view(&gx, 0..n),
                n,
                p,
                seed,
                write,
            })
            .unwrap();
            let mut want = match write {
                GradWrite::Overwrite => vec![0.0; n],
                GradWrite::Accumulate => y0.clone(),
            };
            e.r.dropout(Dropout {
                y: &mut want,
                x: &x,
                n,
                p,
                seed,
                write,
            })
            .unwrap();
            let got = e.down(&gy);
            e.check(
                &format!("dropout {tag} seed {seed} {write:?}"),
                &got,
                &want,
                1,
            );
            if write == GradWrite::Overwrite {
                // Kept elements are exactly the reference's (a zero where x is not is a drop).
                let kept = |v: &[f64]| -> Vec<bool> { v.iter().map(|&a| a != 0.0).collect() };
                assert_eq!(kept(&got), kept(&want), "{tag}: masks differ");
                masks.push(kept(&want));
            }
        }
        let dropped = masks[0].iter().filter(|&&k| !k).count() as f64 / n as f64;
        if n > 1000 {
            assert!(
                (dropped - p as f64).abs() < 0.02,
                "{tag}: dropped {dropped}"
            );
            if p > 0.0 {
                assert_ne!(masks[0], masks[1], "{tag}: seeds 7 and 8 drew one mask");
            }
        }
    }
}

/// `d_weight: None` computes the same `dx` and touches no weight gradient.
pub(crate) fn rmsnorm_frozen<B: Backend>(e: &mut Env<B>) {
    for (n, d) in [(1, 1), (37, 67), (300, 2048)] {
        let tag = format!("n={n} d={d}");
        let (x, w, dy, dx0) = (
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(d, 1.0, Kind::Compute),
            e.randn(n * d, 1.0, Kind::Compute),
            e.randn(n * d, 1.0, Kind::Compute),
        );
        let rstd: Vec<f64> = x
            .chunks(d)
            .map(|r| 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + 1e-5).sqrt())
            .collect();
        let rs = e.round(Kind::Master, &rstd);
        let b = &e.b;
        let (gx, gw, gdy, grs) = (
            e.up(&x, Kind::Compute),
            e.up(&w, Kind::Compute),
            e.up(&dy, Kind::Compute),
            e.up(&rs, Kind::Master),
        );
        let mut gdx = e.up(&dx0, Kind::Compute);
        b.rmsnorm_backward(RmsNormBwd {
            dx: b.view_mut(&mut gdx, 0..n * d),
            d_weight: None,
            dy: b.view(&gdy, 0..n * d),
            x: b.view(&gx, 0..n * d),
            weight: b.view(&gw, 0..d),
            rstd: b.view(&grs, 0..n),
            n,
            d,
            write: GradWrite::Overwrite,
        })
        .unwrap();
        let (mut dx, mut dw) = (dx0.clone(), vec![0.0; d]);
        e.r.rmsnorm_backward(RmsNormBwd {
            dx: &mut dx,
            d_weight: Some(&mut dw),
            dy: &dy,
            x: &x,
            weight: &w,
            rstd: &rs,
            n,
            d,
            write: GradWrite::Overwrite,
        })
        .unwrap();
        e.check(
            &format!("rmsnorm_bwd frozen dx(+=) {tag}"),
            &e.down(&gdx),
            &dx,
            1,
        );
    }
}
