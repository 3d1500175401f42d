//! Samples between training steps (`--sample-every`) against the memory plan on the CPU, whose
//! peak counts every buffer's exact bytes: a run that samples peaks exactly
//! `sampling_bytes` above the same run without samples (the plan's `peak` adds them to
//! everything a step keeps between steps), for full fine-tuning with and without recomputation
//! and for LoRA; a budget that fits the steps but not the samples is refused naming them; the
//! losses are those of the run without samples; two ranks sample and one writes; a stage-3 run
//! is refused.

use nopad_backend::cpu::Cpu;
use nopad_model::lora::memory::LoraShape;
use nopad_model::{Config, Recompute};
use nopad_train::{
    sampling_bytes, train, DeviceSizes, SampleConfig, ShardStage, Summary, TrainConfig,
};

mod common;

/// A run of the tiny preset that samples (`prompts` as ids, `max_new` tokens) every 2 steps.
fn config(dir: &std::path::Path, prompts: &[Vec<i32>], max_new: usize) -> TrainConfig {
    let file = dir.join("prompts.jsonl");
    let lines: String = prompts
        .iter()
        .map(|p| format!("{}\n", serde_json::json!({ "prompt_ids": p })))
        .collect();
    std::fs::write(&file, lines).unwrap();
    let mut c = common::tiny_run(3, 24, 32, 4, 1);
    c.sample = Some(SampleConfig {
        every: 2,
        prompts: file,
        max_new_tokens: max_new,
    });
    c
}

fn run(tc: &TrainConfig) -> (Vec<u64>, Summary) {
    let mut losses = vec![];
    let s = train(&Cpu::<f32>::new(), tc, |r| losses.push(r.loss.to_bits()))
        .unwrap_or_else(|e| panic!("training failed: {e}"));
    (losses, s)
}

#[test]
fn a_run_that_samples_peaks_exactly_the_samples_above_one_that_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = vec![vec![1, 2, 3, 4, 5], vec![7], vec![9, 9, 9]];
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let cfg = Config::preset("tiny").unwrap();
    let dev = DeviceSizes::of(&Cpu::<f32>::new());
    let lora = common::lora_train(4, 0.0);
    for (name, recompute, lora) in [
        ("full", Recompute::None, None),
        ("full, recompute", Recompute::Full, None),
        ("lora", Recompute::None, Some(lora)),
    ] {
        let mut tc = config(dir.path(), &prompts, 9);
        tc.recompute = recompute;
        tc.lora = lora.clone();
        let (with, sw) = run(&tc);
        tc.sample = None;
        let (without, s0) = run(&tc);
        assert_eq!(with, without, "{name}: samples changed the losses");
        let shape = lora.as_ref().map(|l| LoraShape::of(&l.settings, l.base));
        let bytes = sampling_bytes(&cfg, shape.as_ref(), &lens, 9, &dev);
        assert!(bytes > 0);
        assert_eq!(
            sw.peak_memory_bytes,
            s0.peak_memory_bytes + bytes,
            "{name}: the samples' peak"
        );
        // A budget between the two: the steps fit, the samples do not.
        let mut tc = config(dir.path(), &prompts, 9);
        tc.recompute = recompute;
        tc.lora = lora;
        tc.gpu_memory = Some(s0.peak_memory_bytes + bytes / 2);
        refused(&tc, "the steps fit, but not the samples taken between them");
    }
}

/// `tc` fails before its first step with an error that says `want`.
fn refused(tc: &TrainConfig, want: &str) {
    let e = match tc.ranks {
        1 => train(&Cpu::<f32>::new(), tc, |_| {}),
        _ => nopad_train::train_threads::<f32>(tc, |_| {}),
    };
    let e = e.unwrap_err().to_string();
    assert!(e.contains(want), "{e}");
}

#[test]
fn bad_sample_settings_are_refused_before_step_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut tc = config(dir.path(), &[vec![1, 200]], 4);
    refused(&tc, "prompts.jsonl:1: field `prompt_ids`: token id 200");
    tc = config(dir.path(), &[vec![1]], 4);
    tc.ranks = 2;
    tc.shard = Some(ShardStage::Params);
    refused(&tc, "`sample-every`: a run at --shard 3");
}

#[test]
fn every_rank_samples_and_rank_0_writes_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut tc = config(dir.path(), &[vec![3, 1], vec![4]], 5);
    tc.ranks = 2;
    tc.log = Some(dir.path().join("log.jsonl"));
    nopad_train::train_threads::<f32>(&tc, |_| {}).unwrap();
    let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("samples").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![2, 3]);
}
