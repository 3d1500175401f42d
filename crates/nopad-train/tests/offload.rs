//! The offloaded optimizer (`--offload optimizer`, [`Placement::Host`]) on the CPU backend,
//! where the host is the device but every step still goes through the staging buffers and the
//! host state: the same weights and moments, bit for bit, as the optimizer on the device in
//! every `--optim-states` × `--master-weights` mode, in the backward and after it; the same
//! checkpoint files; and a checkpoint resumes exactly with or without offload.

use std::path::Path;

use nopad_backend::cpu::Cpu;
use nopad_backend::Moment;
use nopad_train::{
    train, AdamWConfig, GroupSettings, MasterPrecision, Optimizer, Placement, Resume,
    StatePrecision, TrainConfig,
};

mod common;
#[path = "common/grouped.rs"]
mod grouped;

type B = Cpu<f32>;

const STATES: [StatePrecision; 3] = [
    StatePrecision::F32,
    StatePrecision::Bf16,
    StatePrecision::Block8,
];
const MASTERS: [MasterPrecision; 2] = [MasterPrecision::F32, MasterPrecision::None];

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn offloading_equals_the_device_update_bit_for_bit_in_every_mode() {
    let b = B::new();
    for (states, master, in_backward) in STATES
        .into_iter()
        .flat_map(|s| MASTERS.map(|m| (s, m)))
        .flat_map(|(s, m)| [(s, m, false), (s, m, true)])
    {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            // After the backward, clipping scales the host's gradients too.
            max_grad_norm: (!in_backward).then_some(0.05),
            states,
            master,
            ..AdamWConfig::default()
        };
        let tied = in_backward;
        let what = format!("{states:?} moments, {master:?} master, in backward: {in_backward}");
        let (mut dev, mut loader_d) = grouped::setup(&b, tied);
        let (mut host, mut loader_h) = grouped::setup(&b, tied);
        dev.set_update_in_backward(&b, in_backward).unwrap();
        host.set_update_in_backward(&b, in_backward).unwrap();
        let mut opt_d = Optimizer::new(&b, &dev, cfg).unwrap();
        let mut opt_h = Optimizer::with_placement(&b, &host, cfg, Placement::Host).unwrap();
        assert_eq!(opt_h.placement(), Placement::Host);
        assert!(opt_h.groups().all(|(_, s)| s.placement == Placement::Host));
        let runs = (
            (&mut dev, &mut opt_d, &mut loader_d),
            (&mut host, &mut opt_h, &mut loader_h),
        );
        grouped::three_steps(&b, runs, &what, |step, od, oh, same| {
            let norms = (od.grad_norm.to_bits(), oh.grad_norm.to_bits());
            assert_eq!(norms.0, norms.1, "{what} step {step}");
            assert!(same, "{what}: weights differ after step {step}");
        });
        let n = dev.layout.total;
        let (wd, wh) = (
            opt_d.read_weights(&b, &dev, 0..n).unwrap(),
            opt_h.read_weights(&b, &host, 0..n).unwrap(),
        );
        assert_eq!(bits(&wd), bits(&wh), "{what}: saved weights");
        assert_eq!(opt_d.state_lens(), opt_h.state_lens(), "{what}");
        for (part, len) in opt_d.state_lens().into_iter().enumerate() {
            for which in [Moment::First, Moment::Second] {
                let sd = opt_d.read_state(&b, part, which, 0..len).unwrap();
                let sh = opt_h.read_state(&b, part, which, 0..len).unwrap();
                assert!(sd == sh, "{what}: {which:?} of part {part} differs");
            }
        }
    }
}

#[test]
fn the_placement_is_the_whole_models() {
    let b = B::new();
    let (model, _) = grouped::setup(&b, false);
    let mut opt =
        Optimizer::with_placement(&b, &model, AdamWConfig::default(), Placement::Host).unwrap();
    let kind = model.layout.groups[0].kind;
    let err = opt
        .set_group(
            kind,
            GroupSettings {
                placement: Placement::Device,
                ..GroupSettings::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one placement") && err.contains("--offload"),
        "{err}"
    );
    // The tiny preset's hidden size 16 splits 8-bit blocks between groups, which an update
    // group by group cannot take.
    let mut tc = common::tiny_run(1, 8, 32, 2, 0);
    tc.adamw.states = StatePrecision::Block8;
    tc.offload = Placement::Host;
    let err = train(&b, &tc, |_| {}).unwrap_err().to_string();
    assert!(err.contains("block of 256"), "{err}");
}

/// Steps' (loss, grad norm) bits of a run.
fn run(tc: &TrainConfig) -> Vec<(u64, u64)> {
    let mut trace = vec![];
    train(&B::new(), tc, |r| {
        trace.push((r.loss.to_bits(), r.grad_norm.to_bits()))
    })
    .unwrap_or_else(|e| panic!("training failed: {e}"));
    trace
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// A run with offload writes the checkpoint a run without writes, byte for byte, and a run
/// stopped half way resumes exactly with the other placement.
#[test]
fn checkpoints_are_the_same_files_and_resume_with_or_without_offload() {
    let dir = tempfile::tempdir().unwrap();
    for (states, master) in [
        (StatePrecision::F32, MasterPrecision::F32),
        (StatePrecision::Bf16, MasterPrecision::None),
    ] {
        let mut base = common::tiny_run(6, 40, 48, 4, 2);
        base.adamw.states = states;
        base.adamw.master = master;
        let name = format!("{states:?} moments, {master:?} master");
        let out = |tag: &str| dir.path().join(format!("{name}-{tag}"));
        let full = TrainConfig {
            out: Some(out("device")),
            save_every: Some(3),
            ..base.clone()
        };
        let reference = run(&full);
        let offloaded = run(&TrainConfig {
            out: Some(out("host")),
            offload: Placement::Host,
            ..full.clone()
        });
        assert_eq!(reference, offloaded, "{name}: steps");
        for f in ["optimizer.safetensors", "model.safetensors"] {
            let ck = nopad_train::checkpoint::dir_name(3);
            assert!(
                file(&out("device").join(&ck), f) == file(&out("host").join(&ck), f),
                "{name}: {f} differs"
            );
        }
        for (first, second) in [
            (Placement::Host, Placement::Device),
            (Placement::Device, Placement::Host),
        ] {
            let o = out(&format!("{first:?}-then-{second:?}"));
            let half = TrainConfig {
                out: Some(o.clone()),
                stop_after: Some(3),
                offload: first,
                ..base.clone()
            };
            let mut trace = run(&half);
            trace.extend(run(&TrainConfig {
                stop_after: None,
                resume: Some(Resume::Latest),
                offload: second,
                ..half
            }));
            assert_eq!(trace, reference, "{name}: {first:?} then {second:?}");
            assert!(
                file(&o, "model.safetensors") == file(&out("device"), "model.safetensors"),
                "{name}: {first:?} then {second:?}: final weights differ"
            );
        }
    }
}
