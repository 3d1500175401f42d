//! The optimizer in the backward (`optim_in_backward`) on the CPU backend: the same weights, bit
//! for bit, as the update after the backward without clipping, in every optimizer-state mode;
//! and the settings it cannot honour are refused with the reason.

use nopad_backend::cpu::Cpu;
use nopad_train::{train, AdamWConfig, MasterPrecision, Optimizer, StatePrecision};

mod common;
#[path = "common/grouped.rs"]
mod grouped;
use grouped::setup;

type B = Cpu<f32>;

#[test]
fn updating_in_the_backward_equals_updating_after_it_in_every_state_mode() {
    let b = B::new();
    let modes = [
        (StatePrecision::F32, MasterPrecision::F32, false),
        (StatePrecision::Bf16, MasterPrecision::F32, true),
        (StatePrecision::Block8, MasterPrecision::F32, false),
        (StatePrecision::Block8, MasterPrecision::None, true),
    ];
    for (states, master, tied) in modes {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm: None,
            states,
            master,
            ..AdamWConfig::default()
        };
        let (mut after, mut loader_a) = setup(&b, tied);
        let (mut during, mut loader_d) = setup(&b, tied);
        during.set_update_in_backward(&b, true).unwrap();
        let mut opt_a = Optimizer::new(&b, &after, cfg).unwrap();
        let mut opt_d = Optimizer::new(&b, &during, cfg).unwrap();
        opt_d.check_group_blocks().unwrap();
        let what = format!("{states:?} moments, {master:?} master, tied={tied}");
        let runs = (
            (&mut after, &mut opt_a, &mut loader_a),
            (&mut during, &mut opt_d, &mut loader_d),
        );
        grouped::three_steps(&b, runs, &what, |step, oa, od, same| {
            // The norm is summed group by group instead of run by run: equal up to rounding.
            let rel = (oa.grad_norm - od.grad_norm).abs() / oa.grad_norm;
            assert!(
                rel < 1e-12,
                "{what}: norm {} vs {}",
                oa.grad_norm,
                od.grad_norm
            );
            assert!(same, "{what}: weights differ after step {step}");
        });
        assert!(
            during.grads(&b).is_err(),
            "{what}: no full gradient is kept"
        );
    }
}

#[test]
fn a_whole_run_in_the_backward_logs_what_an_unclipped_run_logs() {
    let mut plain = common::tiny_run(6, 24, 32, 3, 2);
    plain.adamw.max_grad_norm = None;
    let mut during = plain.clone();
    during.optim_in_backward = true;
    let b = B::new();
    let mut logs = [vec![], vec![]];
    for (tc, log) in [&plain, &during].into_iter().zip(&mut logs) {
        train(&b, tc, |r| {
            log.push((r.step, r.loss.to_bits(), r.grad_norm))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(logs[0].len(), 6);
    for (p, d) in logs[0].iter().zip(&logs[1]) {
        assert_eq!((p.0, p.1), (d.0, d.1), "step and loss bits");
        assert!((p.2 - d.2).abs() <= 1e-9 * p.2, "norm {} vs {}", p.2, d.2);
    }
}

#[test]
fn settings_the_update_in_the_backward_cannot_honour_are_refused_with_the_reason() {
    let b = B::new();
    let mut tc = common::tiny_run(2, 24, 32, 3, 1);
    tc.optim_in_backward = true;
    // Clipping needs the global norm before the first update.
    let err = train(&b, &tc, |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("max-grad-norm") && err.contains("clip"),
        "{err}"
    );
    tc.adamw.max_grad_norm = None;
    let mut acc = tc.clone();
    acc.grad_accum = 2;
    let err = train(&b, &acc, |_| {}).unwrap_err().to_string();
    assert!(err.contains("grad-accum"), "{err}");
    // The tiny preset's hidden size 16 splits 8-bit blocks between groups.
    let mut q8 = tc.clone();
    q8.adamw.states = StatePrecision::Block8;
    let err = train(&b, &q8, |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("block of 256") && err.contains("parameter group"),
        "{err}"
    );
}
