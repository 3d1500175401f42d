//! Issue 7 on the CPU backend: checkpoints and exact resume (a run stopped and resumed is
//! bit-identical to an uninterrupted one), refusal of mismatched checkpoints, skipped non-finite
//! steps, and periodic evaluation.

use std::path::Path;
use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::LengthDist;
use nopad_data::{Loader, LoaderOptions, PackOptions, Strategy};
use nopad_model::weights;
use nopad_train::checkpoint::{self, COMPLETE};
use nopad_train::{build_model, load_data, pad_token_id, train_step, SingleProcess};
use nopad_train::{
    train, DataSource, Interrupt, MasterPrecision, ModelSource, Optimizer, Resume, Schedule,
    StatePrecision, StopReason, TrainConfig, TrainError,
};

mod common;

/// A tiny run over 40 examples, so a few steps cross epoch boundaries.
fn config(steps: u64, out: &Path) -> TrainConfig {
    let mut c = common::tiny_run(steps, 40, 48, 4, 3);
    c.out = Some(out.to_path_buf());
    c
}

/// (step, loss, lr, grad norm) as bits, for every step `train` reported.
type Trace = Vec<(u64, u64, u64, u64)>;

fn run(tc: &TrainConfig) -> (Trace, nopad_train::Summary) {
    let b = Cpu::<f32>::new();
    let mut trace = vec![];
    let s = train(&b, tc, |r| {
        trace.push((
            r.step,
            r.loss.to_bits(),
            r.lr.to_bits(),
            r.grad_norm.to_bits(),
        ))
    })
    .unwrap_or_else(|e| panic!("training failed: {e}"));
    (trace, s)
}

/// The final weights a run wrote, in layout order.
fn final_weights(dir: &Path) -> Vec<f32> {
    let cfg = weights::read_config(dir).unwrap();
    let layout = nopad_model::Layout::new(&cfg);
    let mut w = vec![f32::NAN; layout.total];
    weights::load_checkpoint(dir, &cfg, &layout, |off, v| {
        w[off..off + v.len()].copy_from_slice(v);
        Ok(())
    })
    .unwrap();
    w
}

/// The schedule a run of `tc` over `total` steps follows from its start.
fn schedule_of(tc: &TrainConfig, total: u64) -> Schedule {
    Schedule {
        lr: tc.lr,
        min_lr: tc.min_lr,
        warmup: tc.warmup,
        total,
        decay: tc.decay,
        restart: None,
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Runs `tc` uninterrupted, and again stopped after `stop` steps and resumed; both must agree
/// bit for bit (every step's loss, lr and grad norm, and the final weights).
fn check_resume_is_exact(name: &str, tc: TrainConfig, stop: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (a_out, b_out) = (dir.path().join("a"), dir.path().join("b"));
    let (a, sa) = run(&TrainConfig {
        out: Some(a_out.clone()),
        ..tc.clone()
    });
    let first = TrainConfig {
        out: Some(b_out.clone()),
        stop_after: Some(stop),
        ..tc.clone()
    };
    let (mut b, s1) = run(&first);
    assert_eq!(s1.stopped, Some(StopReason::StopAfter(stop)), "{name}");
    assert_eq!(s1.steps_done, stop, "{name}");
    assert!(
        !b_out.join("model.safetensors").exists(),
        "{name}: final weights written early"
    );
    let (c, sc) = run(&TrainConfig {
        stop_after: None,
        resume: Some(Resume::Latest),
        ..first
    });
    assert_eq!(
        sc.resumed_from,
        Some(b_out.join(checkpoint::dir_name(stop))),
        "{name}"
    );
    b.extend(c);
    assert_eq!(a.len() as u64, sa.steps, "{name}");
    assert_eq!(a, b, "{name}: resumed steps differ from uninterrupted ones");
    assert!(
        same_bits(&final_weights(&a_out), &final_weights(&b_out)),
        "{name}: final weights differ"
    );
    assert_eq!(
        (sa.first_loss.to_bits(), sa.last_loss.to_bits()),
        (sc.first_loss.to_bits(), sc.last_loss.to_bits()),
        "{name}"
    );
    assert_eq!(
        (sa.real_tokens, sa.target_tokens, sa.steps_per_epoch),
        (sc.real_tokens, sc.target_tokens, sc.steps_per_epoch),
        "{name}"
    );
}

#[test]
fn stop_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(14, dir.path());
    // 40 examples / 4 per step = 10 steps per epoch: the stop lands in epoch 0, the run ends in 1.
    check_resume_is_exact("flatten", base.clone(), 7);
    let mut offline = base.clone();
    offline.strategy = Strategy::Offline; // the resumed position carries unplaced examples
    offline.batch_size = 2;
    offline.grad_accum = 2;
    offline.steps = None;
    offline.epochs = Some(2.5); // the run's length comes from the checkpoint, not the epoch
    check_resume_is_exact("offline, grad-accum 2, epochs", offline, 5);
    let mut concat = base.clone();
    concat.strategy = Strategy::Concat; // the resumed position is inside an example
    concat.grad_accum = 2;
    concat.steps = Some(8);
    check_resume_is_exact("concat, grad-accum 2", concat, 3);
    let mut pad = base.clone();
    pad.strategy = Strategy::Pad;
    pad.group_by_length = true;
    pad.steps = Some(12);
    check_resume_is_exact("pad, grouped, stop at an epoch end", pad, 10);
    let mut tied = base;
    tied.model = ModelSource::Preset("small".into()); // tied embeddings: no lm_head tensor
    tied.max_len = 32;
    tied.steps = Some(4);
    check_resume_is_exact("small (tied)", tied, 2);
}

#[test]
fn an_interrupt_saves_and_the_resumed_run_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tc = config(9, &dir.path().join("a"));
    let (a, _) = run(&tc);
    let out = dir.path().join("b");
    let interrupt = Interrupt::new();
    let first = TrainConfig {
        out: Some(out.clone()),
        interrupt: Some(interrupt.clone()),
        save_every: Some(2),
        keep: Some(2),
        ..tc.clone()
    };
    let b = Cpu::<f32>::new();
    let mut trace = vec![];
    let s = train(&b, &first, |r| {
        trace.push((
            r.step,
            r.loss.to_bits(),
            r.lr.to_bits(),
            r.grad_norm.to_bits(),
        ));
        if r.step == 5 {
            interrupt.request(15); // as SIGTERM would, in the middle of step 5
        }
    })
    .unwrap();
    assert_eq!(s.stopped, Some(StopReason::Signal(15)));
    assert_eq!(s.checkpoint, Some(out.join("checkpoint-000005")));
    assert!(
        s.to_string()
            .contains("stopped by SIGTERM after step 5 of 9"),
        "{s}"
    );
    // --keep 2: checkpoints 2 and 4 were saved, 2 deleted after the interrupt's save of 5.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-000004", "checkpoint-000005"]);
    let (rest, _) = run(&TrainConfig {
        resume: Some(Resume::Latest),
        interrupt: None,
        ..first
    });
    trace.extend(rest);
    assert_eq!(trace, a);
    assert!(same_bits(
        &final_weights(&dir.path().join("a")),
        &final_weights(&out)
    ));
}

#[test]
fn a_checkpoint_is_hf_weights_plus_state_and_only_complete_ones_are_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let tc = TrainConfig {
        save_every: Some(2),
        ..config(4, &out)
    };
    run(&tc);
    let ck = out.join("checkpoint-000004");
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        COMPLETE,
    ] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    // The HF part loads as a model directory, and equals the final weights.
    assert!(same_bits(&final_weights(&ck), &final_weights(&out)));
    let st = checkpoint::load_state(&ck).unwrap();
    assert_eq!((st.step, st.optimizer_step, st.schedule.total), (4, 4, 4));
    assert_eq!(st.identity.world_size, 1);
    assert_eq!(st.losses.len(), 4);

    // A directory without the marker (a save that never finished) is never chosen.
    let fake = out.join("checkpoint-000009");
    std::fs::create_dir(&fake).unwrap();
    std::fs::copy(
        ck.join("trainer_state.json"),
        fake.join("trainer_state.json"),
    )
    .unwrap();
    std::fs::create_dir(out.join(".checkpoint-000010.tmp-1")).unwrap();
    let (found, _) = checkpoint::latest(&out).unwrap();
    assert_eq!(found.unwrap().0, ck);
    let e = train(
        &Cpu::<f32>::new(),
        &TrainConfig {
            resume: Some(Resume::Dir(fake.clone())),
            ..tc.clone()
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("checkpoint-000009") && e.contains("not a complete checkpoint"),
        "{e}"
    );
    // A marker but an unreadable state: skipped with a note, the older one is used.
    std::fs::write(fake.join(COMPLETE), "9\n").unwrap();
    std::fs::write(fake.join("trainer_state.json"), "{\"step\": ").unwrap();
    let (found, notes) = checkpoint::latest(&out).unwrap();
    assert_eq!(found.unwrap().0, ck);
    assert!(
        notes.iter().any(|n| n.contains("checkpoint-000009")),
        "{notes:?}"
    );
}

/// Every optimizer-state mode resumes bit for bit: the moments are saved in their own precision
/// (bf16 bits, 8-bit codes and scales) and the stochastic rounding of `master-weights none`
/// draws from the run's seed and step, which a resumed run has too.
#[test]
fn every_optimizer_state_mode_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(8, dir.path());
    for (states, master) in [
        (StatePrecision::Bf16, MasterPrecision::F32),
        (StatePrecision::Block8, MasterPrecision::F32),
        (StatePrecision::F32, MasterPrecision::None),
        (StatePrecision::Block8, MasterPrecision::None),
    ] {
        let mut tc = base.clone();
        tc.adamw.states = states;
        tc.adamw.master = master;
        let name = format!("{states:?} moments, {master:?} master");
        check_resume_is_exact(&name, tc, 3);
    }
}

#[test]
fn resuming_another_run_names_every_difference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let tc = TrainConfig {
        stop_after: Some(2),
        ..config(6, &out)
    };
    run(&tc);
    let resume = |f: &dyn Fn(&mut TrainConfig)| -> String {
        let mut c = TrainConfig {
            stop_after: None,
            resume: Some(Resume::Latest),
            ..tc.clone()
        };
        f(&mut c);
        match train(&Cpu::<f32>::new(), &c, |_| {}) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("resumed a mismatched run"),
        }
    };
    let e = resume(&|c| c.strategy = Strategy::Pad);
    assert!(
        e.contains("cannot resume from") && e.contains("checkpoint-000002"),
        "{e}"
    );
    assert!(
        e.contains("`strategy`: checkpoint \"flatten\", this run \"pad\""),
        "{e}"
    );
    let e = resume(&|c| {
        c.data = DataSource::Synthetic {
            dist: LengthDist::FlanLike,
            examples: 41,
        }
    });
    assert!(e.contains("`data.examples`") && e.contains("41"), "{e}");
    let e = resume(&|c| c.model = ModelSource::Preset("small".into()));
    assert!(
        e.contains("`model-config` (model (config.json checksum))"),
        "{e}"
    );
    let e = resume(&|c| {
        c.batch_size = 2;
        c.steps = Some(7);
    });
    // Only the batch is refused: a longer run is allowed.
    assert!(e.contains("`batch-size`") && !e.contains("`steps`"), "{e}");
    let e = resume(&|c| c.stop_after = Some(2));
    assert!(
        e.contains("`stop-after` 2: the checkpoint is already at step 2"),
        "{e}"
    );
    // A checkpoint resumes only in the optimizer mode it was written in.
    let e = resume(&|c| c.adamw.states = StatePrecision::Block8);
    assert!(
        e.contains("`optim-states`: checkpoint \"f32\", this run \"8bit\""),
        "{e}"
    );
    let e = resume(&|c| c.adamw.master = MasterPrecision::None);
    assert!(
        e.contains("`master-weights`: checkpoint \"f32\", this run \"none\""),
        "{e}"
    );
}

#[test]
fn a_planted_nan_is_skipped_counted_and_never_reaches_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let log = dir.path().join("log.jsonl");
    let tc = TrainConfig {
        nan_at_step: Some(3),
        log: Some(log.clone()),
        ..config(6, &out)
    };
    let (trace, s) = run(&tc);
    assert_eq!(s.skipped_steps, 1);
    assert!(s.to_string().contains("1 steps skipped"), "{s}");
    assert!(
        f64::from_bits(trace[2].3).is_nan(),
        "step 3's gradient norm"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[2]["step"], 3);
    assert_eq!(lines[2]["skipped"], true);
    assert_eq!(lines[5]["skipped_steps"], 1);

    // The same run by hand, with step 3's batch taken from the loader but never trained on.
    let b = Cpu::<f32>::new();
    let (mut model, _) = build_model(&b, &tc.model, tc.seed).unwrap();
    let (examples, _) = load_data(&tc.data, &model.cfg, None, &tc).unwrap();
    let mut loader = Loader::new(
        Arc::new(examples),
        LoaderOptions {
            pack: PackOptions {
                strategy: tc.strategy,
                batch_size: tc.batch_size,
                max_len: tc.max_len,
                pad_token_id: pad_token_id(&model.cfg),
                group_by_length: false,
            },
            grad_accum: 1,
            seed: tc.seed,
            shuffle: true,
            start: Default::default(),
            prefetch: 1,
            parallel: nopad_data::DataParallel::ALONE,
        },
    )
    .unwrap();
    let schedule = schedule_of(&tc, 6);
    let mut opt = Optimizer::new(&b, &model, tc.adamw).unwrap();
    for step in 1..=6 {
        let s = loader.next().unwrap();
        if step != 3 {
            let lr = schedule.lr_at(opt.step + 1);
            train_step(&b, &SingleProcess, &mut model, &mut opt, &s.batches, lr).unwrap();
        }
    }
    let w = final_weights(&out);
    assert!(w.iter().all(|x| x.is_finite()));
    assert!(same_bits(&w, &model.params.to_vec()));

    // Too many bad steps in a row stop the run with a message naming the flag.
    let e = train(
        &b,
        &TrainConfig {
            max_bad_steps: 1,
            log: None,
            ..tc
        },
        |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, TrainError::Diverged(_)));
    let e = e.to_string();
    assert!(
        e.contains("step 3") && e.contains("--max-bad-steps 1"),
        "{e}"
    );
}

#[test]
fn periodic_evaluation_is_logged_summarised_and_survives_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let eval = dir.path().join("eval.jsonl");
    std::fs::write(
        &eval,
        "{\"input_ids\": [1, 5, 9, 13, 2], \"labels\": [-100, -100, 9, 13, 2]}\n\
         {\"input_ids\": [1, 7, 7, 7, 7, 7, 2]}\n",
    )
    .unwrap();
    let log = dir.path().join("a.jsonl");
    let tc = TrainConfig {
        eval_data: Some(eval),
        eval_every: Some(3),
        log: Some(log.clone()),
        ..config(7, &dir.path().join("a"))
    };
    let (_, s) = run(&tc);
    let steps: Vec<u64> = s.evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, [3, 6, 7]);
    assert_eq!(s.eval_loss, Some(s.evals[2].eval_loss));
    assert_eq!(s.eval_tokens, Some(9));
    let text = std::fs::read_to_string(&log).unwrap();
    let evals: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 3);
    assert_eq!(evals[1]["step"], 6);
    assert_eq!(evals[1]["eval_tokens"], 9);

    // Stopped at 4 and resumed, the evaluations and the log are those of the whole run.
    let out = dir.path().join("b");
    let blog = dir.path().join("b.jsonl");
    let first = TrainConfig {
        out: Some(out),
        log: Some(blog.clone()),
        stop_after: Some(4),
        ..tc.clone()
    };
    run(&first);
    // A crash after the checkpoint logged a step the resumed run redoes, and tore a line.
    std::fs::write(
        &blog,
        std::fs::read_to_string(&blog).unwrap()
            + "{\"step\": 5, \"loss\": 1.0}\n{\"step\": 6, \"lo",
    )
    .unwrap();
    let (_, r) = run(&TrainConfig {
        stop_after: None,
        resume: Some(Resume::Latest),
        ..first
    });
    assert_eq!(r.evals, s.evals);
    let strip = |t: &str| -> Vec<(u64, Option<u64>, Option<u64>)> {
        t.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let bits = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(f64::to_bits);
                (v["step"].as_u64().unwrap(), bits("loss"), bits("eval_loss"))
            })
            .collect()
    };
    assert_eq!(
        strip(&std::fs::read_to_string(&blog).unwrap()),
        strip(&text)
    );
}

/// A signal during data preparation stops the run before its first step, with nothing written.
#[test]
fn an_interrupt_during_preparation_stops_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 5, 9, 13, 2]}\n".repeat(300)).unwrap();
    let out = dir.path().join("out");
    for source in [
        nopad_train::DataSource::File(data.clone()),
        nopad_train::DataSource::Synthetic {
            dist: LengthDist::FlanLike,
            examples: 40,
        },
    ] {
        let interrupt = Interrupt::new();
        interrupt.request(2); // as a Ctrl-C before the first step would
        let tc = TrainConfig {
            data: source,
            interrupt: Some(interrupt),
            ..config(5, &out)
        };
        let mut steps = 0;
        match train(&Cpu::<f32>::new(), &tc, |_| steps += 1) {
            Err(TrainError::Interrupted(2)) => {}
            other => panic!(
                "expected Interrupted(2), got {:?}",
                other.map(|s| s.steps_done)
            ),
        }
        assert_eq!(steps, 0);
        let left: Vec<_> = std::fs::read_dir(&out).map_or(vec![], |d| d.collect());
        assert!(left.is_empty(), "nothing written: {left:?}");
    }
}

/// A resumed run may go on for more steps or change its learning rate: the decay restarts from
/// the checkpoint's rate to the new end, and the extended run, stopped and resumed again, is
/// exact. Ending before the checkpoint's step is refused.
#[test]
fn a_resumed_run_may_be_extended_or_change_its_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let tc = config(6, &out);
    run(&TrainConfig {
        stop_after: Some(3),
        ..tc.clone()
    });
    let ckpt = |n: u64| Resume::Dir(out.join(checkpoint::dir_name(n)));
    let longer = TrainConfig {
        steps: Some(10),
        resume: Some(ckpt(3)),
        ..tc.clone()
    };
    let (whole, s) = run(&longer);
    assert_eq!(s.steps_done, 10);
    let old = schedule_of(&tc, 6);
    let new = old.continued(3, Schedule { total: 10, ..old });
    assert!(new.restart.is_some());
    for &(step, _, lr, _) in &whole {
        assert_eq!(lr, new.lr_at(step).to_bits(), "step {step}");
    }
    assert_eq!(whole.first().map(|t| t.0), Some(4));
    assert!(f64::from_bits(whole[0].2) < old.lr_at(3) && f64::from_bits(whole[0].2) > old.lr_at(4));
    assert_eq!(f64::from_bits(whole.last().unwrap().2), tc.min_lr);
    // The extended run stopped at 7 and resumed with the same flags continues exactly.
    run(&TrainConfig {
        stop_after: Some(7),
        ..longer.clone()
    });
    let (rest, _) = run(&TrainConfig {
        resume: Some(ckpt(7)),
        ..longer.clone()
    });
    assert_eq!(rest, whole[4..]);
    // A new peak scales the rest of the schedule.
    let (lower, _) = run(&TrainConfig {
        lr: tc.lr / 2.0,
        min_lr: tc.min_lr / 2.0,
        resume: Some(ckpt(3)),
        ..tc.clone()
    });
    let half = old.continued(
        3,
        Schedule {
            lr: tc.lr / 2.0,
            min_lr: tc.min_lr / 2.0,
            ..old
        },
    );
    assert_eq!(lower[0].2, half.lr_at(4).to_bits());
    let e = train(
        &Cpu::<f32>::new(),
        &TrainConfig {
            steps: Some(3),
            resume: Some(ckpt(3)),
            ..tc
        },
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already at step 3"), "{e}");
}
