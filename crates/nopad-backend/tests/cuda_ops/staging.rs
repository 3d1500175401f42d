//! The transport of an offloaded optimizer ([`Staging`]) on CUDA: copies to pinned host memory
//! and back are exact and ordered with the compute stream, weights reach the device rounded as
//! the master copy rounds them, and an update on the host (`Cpu<f32>`'s AdamW between the
//! copies, as `nopad_train`'s offload runs it) matches the update on the device.

use nopad_backend::cpu::Cpu;
use nopad_backend::prelude::*;

use super::{envs, say, Env};

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// `w` as a Compute buffer rounded the way the backend's master copy rounds into parameters.
fn as_master_rounds(e: &Env, w: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut p = e.up(&vec![0.0; n], Kind::Compute);
    if e.gpu.needs_master() {
        let mut lo = e.gpu.master_new(&p, n).unwrap();
        e.gpu.master_write(&mut p, &mut lo, 0, w).unwrap();
    } else {
        e.gpu.write(&mut p, 0, w).unwrap();
    }
    e.down(&p)
}

#[test]
fn staging_copies_are_exact_and_ordered_with_the_compute_stream() {
    let Some(envs) = envs("staging") else { return };
    for mut e in envs {
        for n in [1usize, 257, 100_003] {
            let x = e.randn(n, 1.0);
            let mut src = e.up(&x, Kind::Grad);
            let mut host = e.gpu.host_alloc(n + 3, Kind::Grad).unwrap();
            assert_eq!(e.gpu.host_len(&host), n + 3);
            e.gpu.copy_to_host(src.as_ref(), &mut host).unwrap();
            // Queued next on the compute stream: must not reach the copy.
            e.gpu.write(&mut src, 0, &vec![f32::NAN; n]).unwrap();
            let mut got = vec![0f32; n];
            e.gpu.host_read(&host, &mut got).unwrap();
            assert_eq!(
                bits(&got),
                bits(&x),
                "n={n}: gradients down; seed {}",
                e.seed
            );

            let w: Vec<f32> = (0..n).map(|_| e.rng.normal() as f32).collect();
            let mut up = e.gpu.host_alloc(n, Kind::Compute).unwrap();
            e.gpu.host_write(&mut up, &w).unwrap();
            let mut dst = e.poison(n, Kind::Compute);
            e.gpu.copy_from_host(&mut up, dst.as_mut()).unwrap();
            e.gpu.host_fence(&up).unwrap();
            assert_eq!(
                bits(&e.down(&dst)),
                bits(&as_master_rounds(&e, &w)),
                "n={n}: weights up; seed {}",
                e.seed
            );
        }
        say(&format!("cuda_ops staging copies {:?}: exact", e.mode));
    }
}

#[test]
fn an_offloaded_update_matches_the_device_update() {
    let Some(envs) = envs("offloaded update") else {
        return;
    };
    let cpu = Cpu::<f32>::new();
    for mut e in envs {
        let n = 3 * 256 + 5;
        for (precision, stochastic) in [
            (StatePrecision::F32, false),
            (StatePrecision::Bf16, false),
            (StatePrecision::Block8, false),
            (StatePrecision::F32, true),
            (StatePrecision::Block8, true),
        ] {
            let tag = format!("{precision:?} sr={stochastic}");
            let rounding = if stochastic {
                ParamRounding::Stochastic {
                    seed: e.seed,
                    first_index: 1000,
                }
            } else {
                ParamRounding::Nearest
            };
            let p = e.randn(n, 1.0);
            // On the device: parameters, the master copy where one is kept, the moments.
            let mut dp = e.up(&p, Kind::Compute);
            let mut lo =
                (e.gpu.needs_master() && !stochastic).then(|| e.gpu.master_new(&dp, n).unwrap());
            let mut ds = AdamWState::new(&e.gpu, n, precision).unwrap();
            // Offloaded: the device keeps only the parameters.
            let mut op = e.up(&p, Kind::Compute);
            let (mut hw, mut hs) = (p.clone(), AdamWState::new(&cpu, n, precision).unwrap());
            let mut down = e.gpu.host_alloc(n, Kind::Grad).unwrap();
            let mut up = e.gpu.host_alloc(n, Kind::Compute).unwrap();
            let mut g32 = vec![0f32; n];
            for step in 1..=3 {
                let hp = AdamW {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    step,
                    grad_scale: 0.5,
                };
                let g = e.randn(n, 1.0);
                let dg = e.up(&g, Kind::Grad);
                let (m, v) = ds.views(&e.gpu, 0..n).unwrap();
                e.gpu
                    .adamw_states(AdamWStates {
                        param: dp.as_mut(),
                        master: lo.as_mut().map(|l| l.as_mut()),
                        grad: dg.as_ref(),
                        m,
                        v,
                        n,
                        hp,
                        rounding,
                    })
                    .unwrap();
                e.gpu.copy_to_host(dg.as_ref(), &mut down).unwrap();
                e.gpu.host_read(&down, &mut g32).unwrap();
                let (m, v) = hs.views(&cpu, 0..n).unwrap();
                cpu.adamw_states(AdamWStates {
                    param: &mut hw,
                    master: None,
                    grad: &g32,
                    m,
                    v,
                    n,
                    hp,
                    rounding,
                })
                .unwrap();
                e.gpu.host_write(&mut up, &hw).unwrap();
                e.gpu.copy_from_host(&mut up, op.as_mut()).unwrap();
                e.gpu.host_fence(&up).unwrap();
            }
            // What the forward reads is the host weights rounded as a master copy rounds.
            let offloaded = e.down(&op);
            assert_eq!(
                bits(&offloaded),
                bits(&as_master_rounds(&e, &hw)),
                "{tag}: the weights sent up; seed {}",
                e.seed
            );
            let device = match &lo {
                Some(l) => e.gpu.master_read(&dp, l, 0..n).unwrap(),
                None => e.down(&dp),
            };
            // The updates (about 1e-2 of the weights) compared as the conformance suite does;
            // stochastic rounding flips where the f32 results differ in the last bits.
            let delta = |w: &[f32]| w.iter().zip(&p).map(|(a, b)| a - b).collect::<Vec<_>>();
            let tol = if stochastic { 3e-2 } else { 1e-3 };
            e.check_tol(
                &format!("offloaded update {tag}"),
                &delta(&hw),
                &delta(&device),
                tol,
            );
        }
    }
}
