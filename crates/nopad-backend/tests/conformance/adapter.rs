//! The test bodies of the ops low-rank adapters add: `columns_linear` (an up-projection added
//! into a column block, and its backward), seeded
//! `dropout` (the same mask on every backend, regenerated from the seed), and RMSNorm's backward
//! over a frozen weight (`d_weight: None`), and `dequant_nf4` (a QLoRA base weight read back).
use nopad_backend::prelude::*;

use super::Env;

/// An adapter's up-projection added into a column block of a wider matrix, and its backward
/// reading the block in place: the backend against the reference, the reference against the
/// naive sums, the columns outside the block untouched, both `GradWrite` rules, and a block past
/// the row refused.
pub(crate) fn columns_linear<B: Backend>(e: &mut Env<B>) {
    let mut blocks = vec![
        [1, 1, 0, 1, 1],
        [37, 29, 5, 3, 11],
        [300, 96, 80, 16, 16],
        [131, 200, 0, 16, 200],
        [0, 8, 2, 4, 3],
    ];
    if e.big {
        // The k block of a fused qkv output at the 8B shape's widths, r = 16.
        blocks.push([1031, 6144, 4096, 16, 1024]);
    }
    for [n, stride, c0, d_in, d_out] in blocks {
        let block = ColumnBlock {
            n,
            stride,
            c0,
            d_in,
            d_out,
        };
        let tag = format!("n={n} stride={stride} c0={c0} in={d_in} out={d_out}");
        let (y0, x) = (
            e.randn(n * stride, 1.0, Kind::Compute),
            e.randn(n * d_in, 1.0, Kind::Compute),
        );
        let w = e.randn(d_out * d_in, 0.5, Kind::Compute);
        let s = 0.75f32;
        let b = &e.b;
        let (mut gy, gx, gw) = (
            e.up(&y0, Kind::Compute),
            e.up(&x, Kind::Compute),
            e.up(&w, Kind::Compute),
        );
        b.columns_linear_forward(ColumnsLinearFwd {
            y: b.view_mut(&mut gy, 0..n * stride),
            x: b.view(&gx, 0..n * d_in),
            w: b.view(&gw, 0..d_out * d_in),
            block,
            s,
        })
        .unwrap();
        let mut want = y0.clone();
        e.r.columns_linear_forward(ColumnsLinearFwd {
            y: &mut want,
            x: &x,
            w: &w,
            block,
            s,
        })
        .unwrap();
        // The reference against the naive sums.
        for t in 0..n {
            for j in 0..stride {
                let mut v = y0[t * stride + j];
                if (c0..c0 + d_out).contains(&j) {
                    let o = j - c0;
                    let dot: f64 = (0..d_in).map(|i| x[t * d_in + i] * w[o * d_in + i]).sum();
                    v += 0.75 * dot;
                }
                let r = want[t * stride + j];
                assert!(
                    (r - v).abs() <= 1e-12 * (1.0 + v.abs()),
                    "{tag}: ref ({t}, {j})"
                );
            }
        }
        let got = e.down(&gy);
        e.check(&format!("columns_linear_fwd {tag}"), &got, &want, 1);
        for t in 0..n {
            for j in (0..stride).filter(|j| !(c0..c0 + d_out).contains(j)) {
                assert_eq!(got[t * stride + j], y0[t * stride + j], "{tag}: column {j}");
            }
        }

        let dy = e.randn(n * stride, 1.0, Kind::Compute);
        let dw0 = e.randn(d_out * d_in, 1.0, Kind::Grad);
        for write in [GradWrite::Overwrite, GradWrite::Accumulate] {
            let tag = format!("{tag} {write:?}");
            let b = &e.b;
            let gdy = e.up(&dy, Kind::Compute);
            let mut gdx = e.poison(n * d_in, Kind::Compute);
            let mut gdw = e.grad_before(&dw0, write);
            b.columns_linear_backward(ColumnsLinearBwd {
                dx: b.view_mut(&mut gdx, 0..n * d_in),
                d_w: b.view_mut(&mut gdw, 0..d_out * d_in),
                dy: b.view(&gdy, 0..n * stride),
                x: b.view(&gx, 0..n * d_in),
                w: b.view(&gw, 0..d_out * d_in),
                block,
                s: -1.5,
                write,
            })
            .unwrap();
            let (mut dx, mut dw) = (vec![f64::NAN; n * d_in], dw0.clone());
            e.r.columns_linear_backward(ColumnsLinearBwd {
                dx: &mut dx,
                d_w: &mut dw,
                dy: &dy,
                x: &x,
                w: &w,
                block,
                s: -1.5,
                write,
            })
            .unwrap();
            let dt = |t: usize, o: usize| -1.5 * dy[t * stride + c0 + o];
            for t in 0..n {
                for i in 0..d_in {
                    let v: f64 = (0..d_out).map(|o| dt(t, o) * w[o * d_in + i]).sum();
                    let r = dx[t * d_in + i];
                    assert!((r - v).abs() <= 1e-12 * (1.0 + v.abs()), "{tag}: ref dx");
                }
            }
            for o in 0..d_out {
                for i in 0..d_in {
                    let mut v: f64 = (0..n).map(|t| dt(t, o) * x[t * d_in + i]).sum();
                    if write == GradWrite::Accumulate {
                        v += dw0[o * d_in + i];
                    }
                    let r = dw[o * d_in + i];
                    assert!((r - v).abs() <= 1e-12 * (1.0 + v.abs()), "{tag}: ref d_w");
                }
            }
            e.check(
                &format!("columns_linear_bwd dx {tag}"),
                &e.down(&gdx),
                &dx,
                1,
            );
            let k = 1 + (write == GradWrite::Accumulate) as u32 * e.gk();
            e.check(
                &format!("columns_linear_bwd d_w {tag}"),
                &e.down(&gdw),
                &dw,
                k,
            );
        }
    }
    // A block past the row is refused.
    let b = &e.b;
    let (mut gy, gx, gw) = (
        e.poison(8, Kind::Compute),
        e.poison(8, Kind::Compute),
        e.poison(8, Kind::Compute),
    );
    let r = b.columns_linear_forward(ColumnsLinearFwd {
        y: b.view_mut(&mut gy, 0..8),
        x: b.view(&gx, 0..2),
        w: b.view(&gw, 0..4),
        block: ColumnBlock {
            n: 2,
            stride: 4,
            c0: 1,
            d_in: 1,
            d_out: 4,
        },
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
    // Multiples of 8 take the CUDA backend's wide kernel (8 elements a thread) unless the output
    // view is misaligned (`at` 4: the one-byte kernel); the others the one-byte kernel.
    for (n, at) in [
        (1, 0),
        (63, 0),
        (64, 0),
        (129, 0),
        (8008, 0),
        (8008, 4),
        (64 * 256 * 2, 0),
        (big, 0),
    ] {
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
        let mut gy = e.poison(at + n, Kind::Compute);
        let b = &e.b;
        b.dequant_nf4(DequantNf4 {
            y: b.view_mut(&mut gy, at..at + n),
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
        let got = e.down(&gy)[at..].to_vec();
        e.check(&format!("dequant_nf4 n={n} at={at}"), &got, &want, 0);
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
