//! The paper's findings, reproduced on the CPU with the tiny preset: flatten follows pad's loss
//! curve step by step, concat does not, offline has fewer steps per epoch; the export holds the
//! same examples in the same order.

use std::sync::Arc;

use nopad_backend::cpu::Cpu;
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::Strategy;
use nopad_train::ModelSource;

use crate::{chart, export, markdown, report::max_step_diff, run_strategy, text, BenchConfig};

fn cfg() -> BenchConfig {
    BenchConfig {
        model: ModelSource::Preset("tiny".into()),
        layers: None,
        batch_size: 4,
        grad_accum: 2,
        // Rows of 192 tokens hold several of the (≤ 48-token) examples, so offline packs.
        max_len: 192,
        warmup: 1,
        steps: 5,
        lr: 3e-3,
        seed: 3,
        peak_flops: 1e12,
        profile_steps: 1,
        recompute: nopad_model::Recompute::None,
        grad_aliasing: true,
        optim_states: nopad_train::StatePrecision::F32,
        master_weights: nopad_train::MasterPrecision::F32,
        optim_in_backward: false,
        gpu_memory: None,
        lora: None,
        offload: nopad_train::Placement::Device,
        offload_activations: 0,
    }
}

/// `n_examples` synthetic examples of FLAN-like lengths (at most 48 tokens) over the tiny
/// preset's vocabulary.
fn flan_like(n_examples: usize, seed: u64) -> Vec<nopad_data::Example> {
    instruction_dataset(&SyntheticConfig {
        n_examples,
        vocab_size: 97,
        lengths: LengthDist::FlanLike,
        max_len: 48,
        seed,
    })
}

#[test]
fn flatten_follows_pad_concat_does_not_offline_has_fewer_steps() {
    let b = Cpu::<f32>::new();
    let all = flan_like(120, 1);
    let (train, held) = all.split_at(108);
    let train = Arc::new(train.to_vec());
    let res: Vec<_> = Strategy::ALL
        .iter()
        .map(|&s| run_strategy(&b, &cfg(), s, &train, held, |_, _| {}).unwrap())
        .collect();
    let (pad, concat, flat, off) = (&res[0], &res[1], &res[2], &res[3]);
    assert_eq!(pad.losses.len(), 6);
    assert!(
        max_step_diff(flat, pad) < 1e-4,
        "flatten vs pad: {}",
        max_step_diff(flat, pad)
    );
    assert!(
        max_step_diff(concat, pad) > 1e-2,
        "concat should differ from pad"
    );
    assert_eq!(flat.steps_per_epoch, pad.steps_per_epoch);
    assert!(
        off.steps_per_epoch < pad.steps_per_epoch,
        "offline {} vs pad {}",
        off.steps_per_epoch,
        pad.steps_per_epoch
    );
    assert!(pad.padding_fraction > 0.0 && flat.padding_fraction == 0.0);
    assert!((flat.eval_loss - pad.eval_loss).abs() < 1e-4);
    assert!(
        flat.profile
            .iter()
            .any(|(op, ms)| op == "attention fwd" && *ms > 0.0),
        "{:?}",
        flat.profile
    );
    assert!(flat.profile.iter().any(|(op, _)| op == "adamw+clip"));
    let t = text(&res);
    assert!(
        t.contains("flatten vs pad: same steps per epoch") && t.contains("offline:"),
        "{t}"
    );
    let md = markdown(&res);
    assert!(
        md.starts_with("Device: ") && md.contains("recompute: none") && md.contains("| strategy |"),
        "{md}"
    );
    let dir = tempfile::tempdir().unwrap();
    chart::write_all(dir.path(), &res).unwrap();
    for f in ["throughput.svg", "memory.svg", "loss.svg"] {
        let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("flatten"), "{f}");
    }
}

#[test]
fn export_holds_the_steps_in_order_and_a_loadable_model() {
    let b = Cpu::<f32>::new();
    let all = flan_like(60, 2);
    let train = Arc::new(all[..50].to_vec());
    let dir = tempfile::tempdir().unwrap();
    export(&b, &cfg(), &train, &all[50..], dir.path()).unwrap();
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 6);
    // Every exported example is one of the training examples, unchanged.
    for s in &steps {
        for mb in s["micro_batches"].as_array().unwrap() {
            for ex in mb.as_array().unwrap() {
                let ids: Vec<i32> = serde_json::from_value(ex["input_ids"].clone()).unwrap();
                let labels: Vec<i32> = serde_json::from_value(ex["labels"].clone()).unwrap();
                let orig = train
                    .iter()
                    .find(|e| e.input_ids == ids)
                    .expect("exported example comes from the data");
                assert_eq!(&labels[1..], &orig.labels[1..]);
            }
        }
    }
    let cfg2 = nopad_model::weights::read_config(&dir.path().join("model")).unwrap();
    assert_eq!(cfg2.num_hidden_layers, 2);
}

#[test]
fn useful_flops_count_real_tokens_and_example_attention_only() {
    use crate::useful_flops;
    use nopad_data::{pack_micro_batch, Example, PackOptions};
    let cfg = nopad_model::Config::preset("tiny").unwrap();
    let ex = |n: usize| Example {
        input_ids: (1..=n as i32).collect(),
        labels: (1..=n as i32).collect(),
    };
    let exs = [ex(3), ex(5)];
    let refs: Vec<&Example> = exs.iter().collect();
    let layout = nopad_model::Layout::new(&cfg);
    // Untied: the input embedding is a lookup, not a matmul.
    let n = (layout.total - cfg.vocab_size * cfg.hidden_size) as f64;
    let attn = 6.0
        * (cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers) as f64
        * (9.0 + 25.0);
    let want = 6.0 * n * 8.0 + attn;
    for s in [Strategy::Flatten, Strategy::Pad] {
        let b = pack_micro_batch(
            &refs,
            &PackOptions {
                strategy: s,
                batch_size: 2,
                max_len: 16,
                pad_token_id: 0,
                group_by_length: false,
            },
        );
        let got = useful_flops(&cfg, &b, 0, s, false);
        assert!((got - want).abs() < 1e-6 * want, "{s}: {got} vs {want}");
        // A window of 4 in layer 0 only: the 5-token example loses (5 - 4)² = 1 pair there.
        let mut windowed = cfg.clone();
        windowed.sliding_window = Some(4);
        let mut types = vec![nopad_model::config::LayerType::Full; cfg.num_hidden_layers];
        types[0] = nopad_model::config::LayerType::Sliding;
        windowed.layer_types = Some(types);
        let got = useful_flops(&windowed, &b, 0, s, false);
        let less = 6.0 * (cfg.head_dim * cfg.num_attention_heads) as f64;
        let want = want - less;
        assert!(
            (got - want).abs() < 1e-6 * want,
            "{s} windowed: {got} vs {want}"
        );
    }
}

/// LoRA: every strategy trains adapters (the first loss is the base model's), and the export
/// holds the initial adapter in PEFT's format for the HF side's --init-adapter.
#[test]
fn lora_runs_every_strategy_and_exports_the_initial_adapter() {
    use nopad_model::lora::{read_adapter_config, LoraConfig, Target};
    let b = Cpu::<f32>::new();
    let all = flan_like(60, 2);
    let train = Arc::new(all[..50].to_vec());
    let settings = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![Target::Q, Target::V],
        use_rslora: false,
        seed: 3,
    };
    let lora = BenchConfig {
        lora: Some(nopad_train::LoraTrain {
            settings: settings.clone(),
            adapter: None,
            base: Default::default(),
        }),
        ..cfg()
    };
    for s in [Strategy::Pad, Strategy::Flatten] {
        let full = run_strategy(&b, &cfg(), s, &train, &all[50..], |_, _| {}).unwrap();
        let r = run_strategy(&b, &lora, s, &train, &all[50..], |_, _| {}).unwrap();
        assert_eq!(
            r.losses[0], full.losses[0],
            "{s:?}: B = 0 starts at the base"
        );
        assert!(r.losses.iter().all(|l| l.is_finite()) && r.optimizer.contains("LoRA r 4"));
    }
    let dir = tempfile::tempdir().unwrap();
    export(&b, &lora, &train, &all[50..], dir.path()).unwrap();
    let (got, base) = read_adapter_config(&dir.path().join("adapter")).unwrap();
    assert_eq!(
        got,
        LoraConfig {
            seed: 0,
            ..settings
        }
    );
    assert!(base.unwrap().ends_with("model"));
}
