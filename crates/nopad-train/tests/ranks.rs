//! `--ranks N` runs ([`train_threads`]) around the step: the checkpoints a sharded run writes
//! are those of one rank (gathered), a stopped run of N ranks resumes bit for bit, resuming
//! with another world size is refused naming it, and the steps' imbalance is logged and summed
//! up.

use std::path::Path;

use nopad_backend::cpu::Cpu;
use nopad_train::checkpoint;
use nopad_train::{train_threads, Resume, ShardStage, StopReason, TrainConfig};

mod common;

/// Two ranks of the tiny preset, no clipping (so every stage computes the same bits: the
/// stages differ only in how the norm is summed).
fn config(out: &Path, shard: ShardStage) -> TrainConfig {
    let mut c = common::tiny_run(4, 40, 48, 2, 1);
    c.ranks = 2;
    c.grad_accum = 2;
    c.shard = Some(shard);
    c.adamw.max_grad_norm = None;
    c.out = Some(out.to_path_buf());
    c
}

/// Each step's (step, loss bits) and the rank imbalance of each step.
fn run(tc: &TrainConfig) -> (Vec<(u64, u64)>, nopad_train::Summary, Vec<f64>) {
    let (mut trace, mut imb) = (vec![], vec![]);
    let s = train_threads::<f32>(tc, |r| {
        trace.push((r.step, r.loss.to_bits()));
        imb.extend(r.rank_imbalance.map(|i| i.tokens));
    })
    .unwrap_or_else(|e| panic!("training failed: {e}"));
    (trace, s, imb)
}

/// Every file of a checkpoint directory but the trainer state (which holds timings).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with("trainer_state.json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn sharded_checkpoints_are_one_ranks_and_a_stopped_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("stage0");
    let (trace0, s0, imb) = run(&config(&whole, ShardStage::Replicated));
    assert_eq!(s0.steps_done, 4);
    assert_eq!(imb.len(), 4, "every step logs its imbalance");
    assert!(
        s0.notes.iter().any(|n| n.contains("rank imbalance")),
        "{:?}",
        s0.notes
    );
    for shard in [ShardStage::States, ShardStage::Grads] {
        let st = shard.number();
        let out = tmp.path().join(format!("stage{st}"));
        let mut tc = config(&out, shard);
        tc.save_every = Some(2);
        tc.stop_after = Some(2);
        let (first, s, _) = run(&tc);
        assert_eq!(s.stopped, Some(StopReason::StopAfter(2)));
        let ckpt = out.join("checkpoint-000002");
        // Resumed, it finishes as the uninterrupted run does, bit for bit.
        tc.stop_after = None;
        tc.resume = Some(Resume::Latest);
        let (rest, s, _) = run(&tc);
        assert_eq!(s.steps_done, 4);
        let all: Vec<_> = first.into_iter().chain(rest).collect();
        let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
        if shard == ShardStage::States {
            // Stage 1 adds the gradients as stage 0 does (each rank's sum, then the ranks'),
            // so its run, and the state gathered from its shards, are stage 0's, file for file.
            let mut tc0 = config(&tmp.path().join("ref"), ShardStage::Replicated);
            tc0.save_every = Some(2);
            tc0.stop_after = Some(2);
            run(&tc0);
            let ref_ckpt = tmp.path().join("ref").join("checkpoint-000002");
            assert_eq!(files(&ckpt), files(&ref_ckpt));
            assert_eq!(all, trace0);
            assert_eq!(weights(&out), weights(&whole), "final weights");
        } else {
            // Stage 2 adds micro-batch by micro-batch over the ranks: another order.
            let straight = tmp.path().join("straight");
            let (trace2, _, _) = run(&config(&straight, shard));
            assert_eq!(all, trace2);
            assert_eq!(weights(&out), weights(&straight), "final weights");
        }
        // Another world size is refused, naming it.
        let mut one = tc.clone();
        one.ranks = 1;
        one.grad_accum = 4;
        one.steps = Some(6);
        one.resume = Some(Resume::Dir(out.join("checkpoint-000002")));
        let e = nopad_train::train(&Cpu::<f32>::new(), &one, |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("world-size"), "{e}");
        assert!(checkpoint::load_state(&ckpt).is_ok());
    }
}

#[test]
fn a_rank_that_fails_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tc = config(&tmp.path().join("o"), ShardStage::States);
    // Every rank refuses the setting: the error comes back once, with its rank.
    tc.optim_in_backward = true;
    tc.grad_accum = 1;
    let e = train_threads::<f32>(&tc, |_| {}).unwrap_err().to_string();
    assert!(e.starts_with("rank "), "{e}");
    assert!(e.contains("`optim-in-backward` runs on one rank"), "{e}");
}

/// LoRA with dropout on two ranks: the ranks' micro-batches are dealt by cost, not cut from one
/// rank's, so their dropout masks (a function of the step, the micro-batch's place and the
/// element) depend on the world size, as DDP's do. What holds is determinism: the same 2-rank run
/// twice gives the same bits.
#[test]
fn lora_dropout_on_ranks_is_reproducible() {
    use nopad_model::lora::{LoraConfig, Target};
    let mut two = common::tiny_run(3, 40, 48, 2, 1);
    two.lora = Some(nopad_train::LoraTrain {
        settings: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.3,
            targets: Target::ALL.to_vec(),
            use_rslora: false,
            seed: 0,
        },
        adapter: None,
        base: Default::default(),
    });
    two.ranks = 2;
    two.grad_accum = 2;
    let (a, _, _) = run(&two);
    let (b, _, _) = run(&two);
    assert_eq!(a, b);
    assert!(a.iter().all(|(_, l)| f64::from_bits(*l).is_finite()));
}

/// Stage 3 (weights sharded, gathered per group) with one micro-batch per rank adds the same
/// gradients in the same order as stage 0 (each rank's gradient, summed over the ranks in rank
/// order), so its checkpoint, gathered from the pieces, is stage 0's file for file, a stopped
/// run resumes bit for bit into stage 0's final weights, and the evaluation every rank takes
/// part in gives stage 0's loss.
#[test]
fn stage_3_checkpoints_are_stage_0s_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = tmp.path().join("eval.jsonl");
    let rows: String = (0..5)
        .map(|i| {
            format!(
                "{{\"input_ids\": [{}]}}\n",
                (1..12 + i)
                    .map(|t| (t * 7 + i) % 90 + 3)
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    std::fs::write(&eval, rows).unwrap();
    let config = |name: &str, shard| {
        let mut c = config(&tmp.path().join(name), shard);
        c.grad_accum = 1;
        c.save_every = Some(2);
        c.eval_data = Some(eval.clone());
        c.eval_every = Some(2);
        c
    };
    let whole = config("stage0", ShardStage::Replicated);
    let (trace0, s0, _) = run(&whole);
    let mut tc = config("stage3", ShardStage::Params);
    tc.stop_after = Some(2);
    let (first, s, _) = run(&tc);
    assert_eq!(s.stopped, Some(StopReason::StopAfter(2)));
    let ckpt = |c: &TrainConfig| c.out.as_ref().unwrap().join("checkpoint-000002");
    assert_eq!(files(&ckpt(&tc)), files(&ckpt(&whole)));
    tc.stop_after = None;
    tc.resume = Some(Resume::Latest);
    let (rest, s3, _) = run(&tc);
    let all: Vec<_> = first.into_iter().chain(rest).collect();
    assert_eq!(all, trace0);
    let weights =
        |c: &TrainConfig| std::fs::read(c.out.as_ref().unwrap().join("model.safetensors")).unwrap();
    assert_eq!(weights(&tc), weights(&whole), "final weights");
    let bits = |s: &nopad_train::Summary| s.eval_loss.map(f64::to_bits);
    assert!(s0.eval_loss.is_some_and(f64::is_finite));
    assert_eq!(bits(&s3), bits(&s0), "eval loss");
}
