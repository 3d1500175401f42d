//! AdamW with low-precision optimizer states (`OptimizerOps::adamw_states`): bf16 and 8-bit
//! moments, with the master copy the backend keeps or with stochastic rounding of the weights
//! and no master, against `Cpu<f64>` on the same starting states.
//!
//! The states are stored the same way on every backend (bf16 values, codes of the shared maps,
//! f32 scales, weights rounded with the same random bits), so the backend under test and the
//! reference differ only where an f32 result and its f64 counterpart fall on two sides of a
//! rounding boundary: a rare element off by one bf16 step or one code. The tolerance,
//! [`TOL_STATES`] norm-wise and at most 1 in 1000 differing codes, admits that and rejects a
//! systematic difference (truncating instead of rounding, other random bits, another scale),
//! which moves about half of the elements.

use super::{Env, Store};
use nopad_backend::codes::{code_map, round_bf16, QUANT_BLOCK};
use nopad_backend::prelude::*;

const TOL_STATES: f64 = 1e-3;

/// The hyper-parameters of one test update, at a random step (bias corrections vary).
pub(crate) fn random_hp<B: Backend>(e: &mut Env<B>) -> AdamW {
    AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1 + e.below(100) as u64,
        grad_scale: 0.5,
    }
}

/// A moment's state as values (codes times scales), and its codes when it has some.
fn values(d: &StateData, signed: bool) -> (Vec<f64>, Vec<u8>) {
    match d {
        StateData::F32(x) => (x.iter().map(|&v| v as f64).collect(), vec![]),
        StateData::Bf16(x) => (
            x.iter()
                .map(|&h| f32::from_bits((h as u32) << 16) as f64)
                .collect(),
            vec![],
        ),
        StateData::Block8 { codes, scales } => {
            let map = code_map(signed);
            let v = codes
                .iter()
                .enumerate()
                .map(|(i, &c)| (map[c as usize] * scales[i / QUANT_BLOCK]) as f64)
                .collect();
            (v, codes.clone())
        }
    }
}

/// Random starting states of `n` moments in `precision`.
fn start_state<B: Backend>(
    e: &mut Env<B>,
    precision: StatePrecision,
    n: usize,
    signed: bool,
) -> StateData {
    let scale = if signed { 0.1 } else { 0.01 };
    let draw = |e: &mut Env<B>| {
        let x = e.rng.normal() * scale;
        (if signed { x } else { x.abs() }) as f32
    };
    match precision {
        StatePrecision::F32 => StateData::F32((0..n).map(|_| draw(e)).collect()),
        StatePrecision::Bf16 => StateData::Bf16(
            (0..n)
                .map(|_| nopad_backend::codes::bf16_bits(draw(e)))
                .collect(),
        ),
        StatePrecision::Block8 => StateData::Block8 {
            codes: (0..n).map(|_| e.below(256) as u8).collect(),
            scales: (0..n.div_ceil(QUANT_BLOCK))
                .map(|_| (e.rng.uniform() as f32) * scale as f32 * 3.0)
                .collect(),
        },
    }
}

pub(crate) fn adamw_states<B: Backend>(e: &mut Env<B>) {
    let modes = [
        (StatePrecision::Bf16, false),
        (StatePrecision::Block8, false),
        (StatePrecision::Bf16, true),
        (StatePrecision::Block8, true),
        (StatePrecision::F32, true),
    ];
    // (n, first element of the view in the state): views of 8-bit states start at a block.
    let sizes: &[(usize, usize)] = if e.big {
        &[(1, 0), (1000, 256), (65_537, 0), (1 << 20, 512)]
    } else {
        &[(1, 0), (1000, 256), (65_537, 0)]
    };
    // Cpu<f64> against itself: exact.
    let tol = if e.compute == Store::F64 {
        e.tol(0)
    } else {
        TOL_STATES
    };
    for &(precision, stochastic) in &modes {
        for &(n, off) in sizes {
            let tag = format!("{precision:?} sr={stochastic} n={n} off={off}");
            let hp = random_hp(e);
            let rounding = if stochastic {
                ParamRounding::Stochastic {
                    seed: e.rng.next_u64(),
                    first_index: 12_345,
                }
            } else {
                ParamRounding::Nearest
            };
            // Without a master copy the weights are bf16 values; with one, fp32 values.
            let p: Vec<f64> = if stochastic {
                (0..n)
                    .map(|_| round_bf16(e.rng.normal() as f32) as f64)
                    .collect()
            } else {
                e.randn(n, 1.0, Kind::Master)
            };
            let g = e.randn(n, 1.0, Kind::Grad);
            let (m0, v0) = (
                start_state(e, precision, n, true),
                start_state(e, precision, n, false),
            );
            let total = off + n;
            let r = off..total;
            let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();

            // The backend under test.
            let b = &e.b;
            let pad = |x: &[f64]| [vec![0.0; off], x.to_vec()].concat();
            let mut gp = e.up(&pad(&p), Kind::Compute);
            let mut gmaster = (b.needs_master() && !stochastic).then(|| {
                let mut lo = b.master_new(&gp, total).unwrap();
                b.master_write(&mut gp, &mut lo, off, &p32).unwrap();
                lo
            });
            let gg = e.up(&pad(&g), Kind::Grad);
            let mut gs = AdamWState::new(b, total, precision).unwrap();
            gs.write(b, Moment::First, off, &m0).unwrap();
            gs.write(b, Moment::Second, off, &v0).unwrap();
            let (m, v) = gs.views(b, r.clone()).unwrap();
            b.adamw_states(AdamWStates {
                param: b.view_mut(&mut gp, r.clone()),
                master: gmaster.as_mut().map(|lo| b.view_mut(lo, r.clone())),
                grad: b.view(&gg, r.clone()),
                m,
                v,
                n,
                hp,
                rounding,
            })
            .unwrap();

            // The reference.
            let (mut cp, mut cs) = (p.clone(), AdamWState::new(&e.r, n, precision).unwrap());
            cs.write(&e.r, Moment::First, 0, &m0).unwrap();
            cs.write(&e.r, Moment::Second, 0, &v0).unwrap();
            let (m, v) = cs.views(&e.r, 0..n).unwrap();
            e.r.adamw_states(AdamWStates {
                param: &mut cp,
                master: None,
                grad: &g,
                m,
                v,
                n,
                hp,
                rounding,
            })
            .unwrap();

            let weights: Vec<f64> = match &gmaster {
                Some(lo) => {
                    let w = b.master_read(&gp, lo, r.clone()).unwrap();
                    w.into_iter().map(f64::from).collect()
                }
                None => b.read_f64(&gp, r.clone()).unwrap(),
            };
            if stochastic {
                e.check_tol(
                    &format!("adamw_states weights {tag}"),
                    &weights,
                    &cp,
                    TOL_STATES,
                );
                let off_grid = weights
                    .iter()
                    .filter(|&&w| round_bf16(w as f32) as f64 != w)
                    .count();
                assert_eq!(off_grid, 0, "{tag}: weights must stay bf16 values");
            } else {
                // As the fp32 path: the update is ~1e-3 of the weights, so the change is
                // compared too, against the f32 rounding of the weights.
                e.check(&format!("adamw_states weights {tag}"), &weights, &cp, 0);
                let delta = |a: &[f64]| a.iter().zip(&p).map(|(x, y)| x - y).collect::<Vec<_>>();
                let norm = |a: &[f64]| a.iter().map(|x| x * x).sum::<f64>().sqrt();
                let dtol = match e.compute {
                    Store::F64 => e.tol(0),
                    _ => {
                        TOL_STATES + 2.0 * 2f64.powi(-24) * norm(&p) / norm(&delta(&cp)).max(1e-30)
                    }
                };
                let what = format!("adamw_states weight delta {tag}");
                e.check_tol(&what, &delta(&weights), &delta(&cp), dtol);
            }
            for (which, signed, name) in [(Moment::First, true, "m"), (Moment::Second, false, "v")]
            {
                let got = gs.read(b, which, r.clone()).unwrap();
                let want = cs.read(&e.r, which, 0..n).unwrap();
                assert_eq!(got.precision(), precision);
                let ((gv, gc), (wv, wc)) = (values(&got, signed), values(&want, signed));
                e.check_tol(&format!("adamw_states {name} {tag}"), &gv, &wv, tol);
                let differ = gc.iter().zip(&wc).filter(|(a, b)| a != b).count();
                assert!(
                    differ <= n / 1000 + 1,
                    "{tag}: {differ} of {n} codes of {name} differ from the reference; seed {}",
                    e.seed
                );
            }
        }
    }
}
