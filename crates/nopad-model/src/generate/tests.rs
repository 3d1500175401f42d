//! Generation on the CPU in f64: greedy decoding with the KV cache equals greedy decoding that
//! re-runs the whole forward over the growing sequence, token for token and logit for logit,
//! for a batch of prompts of different lengths (plain, Qwen3's q/k norms, a sliding window,
//! tied with biases, GQA 4/1, a LoRA adapter, a LoRA adapter over an NF4 base); a LoRA model generates what its merged model
//! generates; a prompt generates the same alone as in a batch; sampling repeats with its seed;
//! an end-of-sequence id ends only its sequence; the buffers are what `generate::bytes` says.

use nopad_backend::cpu::Cpu;
use nopad_backend::{Device, Kind};
use nopad_rng::Rng;

use super::{bytes, eos_ids, GenerateOptions, Sampling, Stop};
use crate::config::LayerType;
use crate::lora::{init_adapter, merge, LoraConfig, Target};
use crate::memory::Device as MemDevice;
use crate::quant::BaseDtype;
use crate::tests::{init_base, tiny, tiny_qwen3};
use crate::{Config, Model};

type M = Model<Cpu<f64>>;

fn greedy(max_new: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: max_new,
        sampling: Sampling::GREEDY,
        seed: 0,
        eos: vec![],
    }
}

fn prompts(rng: &mut Rng, lens: &[usize], vocab: usize) -> Vec<Vec<i32>> {
    lens.iter()
        .map(|&l| (0..l).map(|_| rng.below(vocab as u64) as i32).collect())
        .collect()
}

fn plain(b: &Cpu<f64>, cfg: Config, seed: u64) -> M {
    let mut m = Model::new_eval(b, cfg.clone()).unwrap();
    init_base(b, &mut m, cfg, seed);
    m
}

fn lora_settings() -> LoraConfig {
    LoraConfig {
        r: 3,
        alpha: 5.0,
        dropout: 0.1,
        targets: Target::ALL.to_vec(),
        use_rslora: false,
        seed: 4,
    }
}

/// A LoRA model (evaluation) over `base`, its B drawn so the adapters change the output.
fn lora(b: &Cpu<f64>, cfg: Config, base: BaseDtype, seed: u64) -> M {
    let mut m = Model::new_lora_over(b, cfg.clone(), lora_settings(), base, false).unwrap();
    init_base(b, &mut m, cfg, seed);
    let layout = m.adapter_layout().unwrap().clone();
    init_adapter(&layout, 4, |off, v| m.write_adapter(b, off, v)).unwrap();
    let mut rng = Rng::new(seed ^ 5);
    for md in layout.layers.iter().flatten() {
        let v: Vec<f32> = md.b.clone().map(|_| 0.4 * rng.normal() as f32).collect();
        m.write_adapter(b, md.b.start, &v).unwrap();
    }
    m
}

/// Greedy decoding of every prompt with the cache: the tokens and each step's logits.
fn with_cache(b: &Cpu<f64>, m: &mut M, ps: &[Vec<i32>], n: usize) -> Vec<(Vec<i32>, Vec<f64>)> {
    let mut logits = vec![Vec::new(); ps.len()];
    let out = m
        .generate_with(b, ps, &greedy(n), |i, l| logits[i].extend_from_slice(l))
        .unwrap();
    out.into_iter().map(|g| g.ids).zip(logits).collect()
}

/// Greedy decoding without a cache: each token from a fresh forward over the prompt and every
/// token chosen so far (the prefill alone, one sequence).
fn without_cache(b: &Cpu<f64>, m: &mut M, prompt: &[i32], n: usize) -> (Vec<i32>, Vec<f64>) {
    let (mut seq, mut logits) = (prompt.to_vec(), Vec::new());
    for _ in 0..n {
        let mut row = Vec::new();
        let g = m
            .generate_with(b, &[seq.clone()], &greedy(1), |_, l| row = l.to_vec())
            .unwrap();
        seq.push(g[0].ids[0]);
        logits.extend(row);
    }
    (seq[prompt.len()..].to_vec(), logits)
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

#[test]
fn greedy_with_the_kv_cache_equals_greedy_rerunning_the_whole_forward() {
    let b = Cpu::<f64>::new();
    let mut mqa = tiny(false, false);
    mqa.num_key_value_heads = 1;
    // Layer 0 slides with a window of 4 (shorter than most prompts plus their new tokens),
    // the others attend fully.
    let mut windowed = tiny(false, false);
    windowed.sliding_window = Some(4);
    let mut types = vec![LayerType::Full; windowed.num_hidden_layers];
    types[0] = LayerType::Sliding;
    windowed.layer_types = Some(types);
    let models: Vec<(&str, M)> = vec![
        ("untied", plain(&b, tiny(false, false), 1)),
        ("qwen3 q/k norms", plain(&b, tiny_qwen3(false, false), 6)),
        ("sliding window", plain(&b, windowed, 7)),
        ("tied, biases", plain(&b, tiny(true, true), 2)),
        ("gqa 4/1", plain(&b, mqa, 3)),
        ("lora", lora(&b, tiny(false, true), BaseDtype::Bf16, 4)),
        (
            "lora over nf4",
            lora(&b, tiny(true, false), BaseDtype::Nf4, 5),
        ),
    ];
    let mut rng = Rng::new(9);
    for (name, mut m) in models {
        let ps = prompts(&mut rng, &[5, 1, 12, 3], m.cfg.vocab_size);
        let cached = with_cache(&b, &mut m, &ps, 7);
        for (i, p) in ps.iter().enumerate() {
            let (ids, logits) = without_cache(&b, &mut m, p, 7);
            assert_eq!(cached[i].0, ids, "{name}: prompt {i}");
            let r = rel(&cached[i].1, &logits);
            assert!(r < 1e-12, "{name}: prompt {i}: logits differ by {r:.2e}");
        }
        // A prompt alone generates what it generates in the batch.
        let alone = with_cache(&b, &mut m, &ps[2..3], 7);
        assert_eq!(alone[0].0, cached[2].0, "{name}");
    }
}

#[test]
fn a_lora_model_generates_what_its_merged_model_generates() {
    let b = Cpu::<f64>::new();
    let cfg = tiny(false, true);
    let mut m = lora(&b, cfg.clone(), BaseDtype::Bf16, 7);
    let mut base = b.read_f64(&m.params, 0..m.layout.total).unwrap();
    let alayout = m.adapter_layout().unwrap().clone();
    let vals: Vec<f64> = m
        .read_adapter(&b)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    merge(&m.layout, &lora_settings(), &alayout, &vals, &mut base);
    let mut merged = Model::new_eval(&b, cfg).unwrap();
    let host: Vec<f32> = base.iter().map(|&x| x as f32).collect();
    merged.write_params(&b, 0, &host).unwrap();
    let ps = prompts(&mut Rng::new(3), &[4, 9, 2], m.cfg.vocab_size);
    let (a, z) = (
        with_cache(&b, &mut m, &ps, 8),
        with_cache(&b, &mut merged, &ps, 8),
    );
    for (i, (x, y)) in a.iter().zip(&z).enumerate() {
        assert_eq!(x.0, y.0, "prompt {i}");
        // The merged weights were written through f32.
        assert!(
            rel(&x.1, &y.1) < 1e-5,
            "prompt {i}: {:.2e}",
            rel(&x.1, &y.1)
        );
    }
}

#[test]
fn sampling_repeats_with_its_seed_and_eos_ends_only_its_sequence() {
    let b = Cpu::<f64>::new();
    let mut m = plain(&b, tiny(false, false), 11);
    let ps = prompts(&mut Rng::new(4), &[3, 6, 2], m.cfg.vocab_size);
    let opts = |seed| GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 1.5,
            top_k: 30,
            top_p: 0.95,
        },
        seed,
        eos: vec![],
    };
    let ids = |m: &mut M, o| -> Vec<Vec<i32>> {
        m.generate(&b, &ps, &o)
            .unwrap()
            .into_iter()
            .map(|g| g.ids)
            .collect()
    };
    let (x, y, z) = (
        ids(&mut m, opts(1)),
        ids(&mut m, opts(1)),
        ids(&mut m, opts(2)),
    );
    assert_eq!(x, y);
    assert_ne!(x, z);
    assert!(x.iter().all(|s| s.len() == 12));
    // The first greedy token of prompt 1 as the only end-of-sequence id.
    let g = m.generate(&b, &ps, &greedy(5)).unwrap();
    let eos = g[1].ids[0];
    let o = GenerateOptions {
        eos: vec![eos],
        ..greedy(5)
    };
    let e = m.generate(&b, &ps, &o).unwrap();
    assert_eq!((e[1].ids.clone(), e[1].stop), (vec![eos], Stop::Eos));
    for i in [0, 2] {
        let cut = g[i].ids.iter().position(|&t| t == eos);
        let want = match cut {
            Some(k) => (g[i].ids[..=k].to_vec(), Stop::Eos),
            None => (g[i].ids.clone(), Stop::Length),
        };
        assert_eq!((e[i].ids.clone(), e[i].stop), want, "prompt {i}");
    }
}

#[test]
fn bad_prompts_are_refused_by_name() {
    let b = Cpu::<f64>::new();
    let mut m = plain(&b, tiny(false, false), 1);
    let err = |ps: Vec<Vec<i32>>, m: &mut M| m.generate(&b, &ps, &greedy(2)).unwrap_err();
    assert!(err(vec![vec![1], vec![]], &mut m)
        .to_string()
        .contains("prompt 1 has no token"));
    let e = err(vec![vec![1, 97]], &mut m).to_string();
    assert!(
        e.contains("token id 97 is outside the vocabulary of 97"),
        "{e}"
    );
    assert!(err(vec![], &mut m).to_string().contains("no prompt"));
    let o = GenerateOptions {
        sampling: Sampling {
            temperature: -1.0,
            ..Sampling::GREEDY
        },
        ..greedy(2)
    };
    let e = m.generate(&b, &[vec![1]], &o).unwrap_err().to_string();
    assert!(e.contains("--temperature"), "{e}");
    let none = m.generate(&b, &[vec![1], vec![2, 3]], &greedy(0)).unwrap();
    assert!(none
        .iter()
        .all(|g| g.ids.is_empty() && g.stop == Stop::Length));
}

#[test]
fn the_buffers_are_what_generate_bytes_counts() {
    for (base, lens) in [(None, vec![7, 1, 4]), (Some(BaseDtype::Bf16), vec![2, 9])] {
        let b = Cpu::<f64>::new();
        let cfg = tiny(false, true);
        let mut m = match base {
            None => plain(&b, cfg.clone(), 1),
            Some(d) => lora(&b, cfg.clone(), d, 1),
        };
        let before = b.peak_memory();
        let ps = prompts(&mut Rng::new(1), &lens, cfg.vocab_size);
        m.generate(&b, &ps, &greedy(6)).unwrap();
        let size = |_: Kind| 8;
        let dev = MemDevice {
            size: &size,
            acc: b.accounting(),
        };
        let want = bytes(&cfg, m.adapter_layout(), &lens, 6, &dev);
        assert_eq!(b.peak_memory() - before, want, "{base:?}");
    }
}

#[test]
fn eos_ids_come_from_generation_config_else_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny(false, false);
    cfg.eos_token_id = Some(serde_json::json!([5, 7]));
    assert_eq!(eos_ids(&cfg, None).unwrap(), vec![5, 7]);
    assert_eq!(eos_ids(&cfg, Some(dir.path())).unwrap(), vec![5, 7]);
    let gen = dir.path().join("generation_config.json");
    // A generation config that sets the ids decides alone, as in HF; one that does not
    // leaves the config's.
    std::fs::write(&gen, r#"{"eos_token_id": [9, 7], "do_sample": true}"#).unwrap();
    assert_eq!(eos_ids(&cfg, Some(dir.path())).unwrap(), vec![9, 7]);
    std::fs::write(&gen, r#"{"do_sample": true}"#).unwrap();
    assert_eq!(eos_ids(&cfg, Some(dir.path())).unwrap(), vec![5, 7]);
    std::fs::write(&gen, r#"{"eos_token_id": "x"}"#).unwrap();
    let e = eos_ids(&cfg, Some(dir.path())).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json: field `eos_token_id`"),
        "{e}"
    );
    cfg.eos_token_id = None;
    std::fs::remove_file(&gen).unwrap();
    assert!(eos_ids(&cfg, Some(dir.path())).unwrap().is_empty());
}
