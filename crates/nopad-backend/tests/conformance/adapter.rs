//! The test bodies of the ops low-rank adapters add: `columns` (added in and gathered), seeded
//! `dropout` (the same mask on every backend, regenerated from the seed), and RMSNorm's backward
//! over a frozen weight (`d_weight: None`), and `dequant_nf4` (a QLoRA base weight read back).
use nopad_backend::prelude::*;

use super::Env;

/// Scatter into and gather from columns of a wider matrix, including its first and last ones;
/// the columns outside the window must be left untouched.
pub(crate) fn adapter_columns<B: Backend>(e: &mut Env<B>) {
    for rows in [
        [1, 1, 0, 1],
        [37, 29, 0, 29],
        [37, 29, 5, 11],
        [300, 96, 80, 16],
    ] {
        let [n, stride, c0, w] = rows;
        let tag = format!("n={n} stride={stride} c0={c0} w={w}");
        let (y0, x) = (
            e.randn(n * stride, 1.0, Kind::Compute),
            e.randn(n * w, 1.0, Kind::Compute),
        );
        let b = &e.b;
        let (mut gy, gx) = (e.up(&y0, Kind::Compute), e.up(&x, Kind::Compute));
        b.columns(Columns {
            y: b.view_mut(&mut gy, 0..n * stride),
            x: b.view(&gx, 0..n * w),
            rows,
            s: 0.75,
            add: true,
        })
        .unwrap();
        let mut want = y0.clone();
        let (y, s) = (&mut want, 0.75);
        e.r.columns(Columns {
            y,
            x: &x,
            rows,
            s,
            add: true,
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
        b.columns(Columns {
            y: b.view_mut(&mut gt, 0..n * w),
            x: b.view(&gy0, 0..n * stride),
            rows,
            s: -1.5,
            add: false,
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
    let r = b.columns(Columns {
        y: b.view_mut(&mut gy, 0..8),
        x: b.view(&gx, 0..8),
        rows: [2, 4, 1, 4],
        s: 1.0,
        add: true,
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

/// `d_weight: None` computes the same `dx` as with a weight gradient, bit for bit.
pub(crate) fn rmsnorm_frozen<B: Backend>(e: &mut Env<B>) {
    for (n, d) in [(1, 1), (37, 67), (300, 2048)] {
        let tag = format!("n={n} d={d}");
        let [x, w, dy, dx0] = [n * d, d, n * d, n * d].map(|len| e.randn(len, 1.0, Kind::Compute));
        let rstd = e
            .randn(n, 0.1, Kind::Master)
            .iter()
            .map(|v| 1.0 + v.abs())
            .collect::<Vec<_>>();
        let rs = e.round(Kind::Master, &rstd);
        let b = &e.b;
        let [gx, gw, gdy] = [&x, &w, &dy].map(|v| e.up(v, Kind::Compute));
        let grs = e.up(&rs, Kind::Master);
        let mut dxs = Vec::new();
        for frozen in [false, true] {
            let (mut gdx, mut gdw) = (e.up(&dx0, Kind::Compute), e.poison(d, Kind::Grad));
            b.rmsnorm_backward(RmsNormBwd {
                dx: b.view_mut(&mut gdx, 0..n * d),
                d_weight: (!frozen).then(|| b.view_mut(&mut gdw, 0..d)),
                dy: b.view(&gdy, 0..n * d),
                x: b.view(&gx, 0..n * d),
                weight: b.view(&gw, 0..d),
                rstd: b.view(&grs, 0..n),
                n,
                d,
                write: GradWrite::Overwrite,
            })
            .unwrap();
            dxs.push(e.down(&gdx));
        }
        e.check(
            &format!("rmsnorm_bwd frozen dx(+=) {tag}"),
            &dxs[1],
            &dxs[0],
            0,
        );
        let same = dxs[0]
            .iter()
            .zip(&dxs[1])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{tag}: a frozen weight changed dx");
    }
}

/// An NF4 matrix on fresh random codes, scale codes, absmax and mean (odd lengths, partial
/// blocks, several 256-scale blocks) against the host formula of `nopad_backend::nf4`: equal
/// bit for bit once rounded to the Compute type (the kernel mirrors the f32 arithmetic).
pub(crate) fn dequant_nf4<B: Backend>(e: &mut Env<B>) {
    let big = if e.big {
        64 * 256 * 3 + 5
    } else {
        64 * 256 + 77
    };
    for n in [1, 63, 64, 129, big] {
        let (nc, nb, na) = nopad_backend::nf4::nf4_lens(n);
        let codes: Vec<u8> = (0..nc).map(|_| e.below(256) as u8).collect();
        let scale_codes: Vec<u8> = (0..nb).map(|_| e.below(256) as u8).collect();
        let mut absmax: Vec<f32> = (0..na).map(|_| e.rng.normal().abs() as f32 + 0.1).collect();
        absmax[na - 1] = e.rng.normal() as f32;
        let host = nopad_backend::nf4::dequantise_nf4(n, &codes, &scale_codes, &absmax);
        let to64 = |v: &[u8]| v.iter().map(|&c| c as f64).collect::<Vec<_>>();
        let am: Vec<f64> = absmax.iter().map(|&x| x as f64).collect();
        let (gc, gs, ga) = (
            e.up(&to64(&codes), Kind::Code8),
            e.up(&to64(&scale_codes), Kind::Code8),
            e.up(&am, Kind::Master),
        );
        let mut gy = e.poison(n, Kind::Compute);
        let b = &e.b;
        b.dequant_nf4(DequantNf4 {
            y: b.view_mut(&mut gy, 0..n),
            codes: b.view(&gc, 0..nc),
            scale_codes: b.view(&gs, 0..nb),
            absmax: b.view(&ga, 0..na),
            n,
        })
        .unwrap();
        let want = e.round(
            Kind::Compute,
            &host.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        let got = e.down(&gy);
        e.check(&format!("dequant_nf4 n={n}"), &got, &want, 0);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "n={n}: element {i}");
        }
    }
    // Too short a scale buffer is refused.
    let b = &e.b;
    // Codes are integers 0..=255 on every backend (CUDA refuses NaN in a code buffer).
    let (mut gy, gc) = (e.poison(128, Kind::Compute), e.up(&[0.0; 64], Kind::Code8));
    let (gs, ga) = (e.up(&[0.0], Kind::Code8), e.poison(2, Kind::Master));
    let r = b.dequant_nf4(DequantNf4 {
        y: b.view_mut(&mut gy, 0..128),
        codes: b.view(&gc, 0..64),
        scale_codes: b.view(&gs, 0..1),
        absmax: b.view(&ga, 0..2),
        n: 128,
    });
    assert!(r.is_err());
}
