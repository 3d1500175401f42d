//! A checkpoint's `trainer_state.json` is untrusted input: a state that disagrees with itself,
//! with its directory or with the run's flags is refused with the field named, never trained on.

use std::path::{Path, PathBuf};

use nopad_backend::cpu::Cpu;
use nopad_train::checkpoint;
use nopad_train::{train, Resume, StopReason, TrainConfig};
use serde_json::Value;

mod common;

/// A tiny run of 6 steps over 40 examples (several epochs), stopped with a checkpoint after 4.
fn saved_run(out: &Path, strategy: nopad_data::Strategy) -> (TrainConfig, PathBuf) {
    let mut tc = common::tiny_run(6, 40, 48, 8, 2);
    tc.strategy = strategy;
    tc.out = Some(out.to_path_buf());
    let first = TrainConfig {
        stop_after: Some(4),
        ..tc.clone()
    };
    let s = train(&Cpu::<f32>::new(), &first, |_| {}).expect("the first session trains");
    assert_eq!(s.stopped, Some(StopReason::StopAfter(4)));
    (tc, out.join(checkpoint::dir_name(4)))
}

fn edit(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("trainer_state.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn resume_error(tc: &TrainConfig, dir: &Path) -> String {
    let tc = TrainConfig {
        resume: Some(Resume::Dir(dir.to_path_buf())),
        ..tc.clone()
    };
    match train(&Cpu::<f32>::new(), &tc, |_| {}) {
        Ok(s) => panic!("a tampered checkpoint resumed: {:?}", s.steps_done),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_untouched_checkpoint_resumes() {
    for strategy in [
        nopad_data::Strategy::Flatten,
        nopad_data::Strategy::Offline,
        nopad_data::Strategy::Concat,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (tc, dir) = saved_run(tmp.path(), strategy);
        let tc = TrainConfig {
            resume: Some(Resume::Dir(dir)),
            ..tc
        };
        let s = train(&Cpu::<f32>::new(), &tc, |_| {}).expect("an honest checkpoint resumes");
        assert_eq!(s.steps_done, 6, "{strategy:?}");
    }
}

#[test]
fn tampered_states_are_refused_with_the_field_named() {
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 9] = [
        ("`step`", |v| v["step"] = 3.into()),
        ("`step`", |v| {
            v["step"] = 9.into();
            v["optimizer_step"] = 9.into();
        }),
        ("`schedule.total`", |v| {
            v["schedule"]["total"] = 1_000_000_000_000_000_000u64.into()
        }),
        ("`data_position.epoch`", |v| {
            v["data_position"]["epoch"] = 1_000_000_000_000u64.into()
        }),
        ("`optimizer_step`", |v| v["optimizer_step"] = 7.into()),
        ("`data_position.cursor`", |v| {
            v["data_position"]["cursor"] = 4000.into()
        }),
        ("`steps_per_epoch`", |v| v["steps_per_epoch"] = 0.into()),
        ("`schedule.lr`", |v| v["schedule"]["lr"] = 5.0.into()),
        ("`losses`", |v| {
            v["losses"] = Value::Array(vec![1.0.into(); 50]);
        }),
    ];
    for (field, f) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (tc, dir) = saved_run(tmp.path(), nopad_data::Strategy::Flatten);
        edit(&dir, f);
        let msg = resume_error(&tc, &dir);
        assert!(
            msg.contains(field) && msg.contains("trainer_state.json"),
            "{field}: {msg}"
        );
    }
}

#[test]
fn a_renamed_checkpoint_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (tc, dir) = saved_run(tmp.path(), nopad_data::Strategy::Flatten);
    let renamed = tmp.path().join(checkpoint::dir_name(2));
    std::fs::rename(&dir, &renamed).unwrap();
    let msg = resume_error(&tc, &renamed);
    assert!(
        msg.contains("`step`") && msg.contains("checkpoint-000002"),
        "{msg}"
    );
}
