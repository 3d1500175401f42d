//! Throughput of loading (parsing, tokenizing, masking) and packing, in tokens per second.
//!
//! Not a timed test: a plain program that prints medians over repeated runs after a warm-up,
//! with the spread. Run with `cargo bench -p nopad-data --bench packing`. Data: the built-in
//! FLAN-like length distribution (median 180 tokens, σ 0.9), 20,000 examples (about 5.4M
//! tokens). Text input uses a byte-level BPE tokenizer (8k vocabulary) trained here on generated
//! words, since nothing may be downloaded; a real model's tokenizer can be timed instead by
//! setting NOPAD_BENCH_TOKENIZER=DIR.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{
    load_examples, pack_micro_batch, Example, LoadOptions, Loader, LoaderOptions, PackOptions,
    Strategy,
};
use nopad_rng::Rng;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const N_EXAMPLES: usize = 20_000;
const MAX_LEN: usize = 4096;
const RUNS: usize = 5;

/// Runs `f` once to warm up, then RUNS times; prints median tokens/s and the min-max spread.
fn bench(name: &str, tokens: usize, mut f: impl FnMut()) {
    f();
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            tokens as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "{name:<44} {:>8.2} M tokens/s  (min {:.2}, max {:.2}; {tokens} tokens, {RUNS} runs)",
        rates[RUNS / 2] / 1e6,
        rates[0] / 1e6,
        rates[RUNS - 1] / 1e6
    );
}

fn write_pretokenized(path: &Path, data: &[Example]) {
    let mut s = String::new();
    for e in data {
        let _ = writeln!(
            s,
            "{{\"input_ids\": {:?}, \"labels\": {:?}}}",
            e.input_ids, e.labels
        );
    }
    std::fs::write(path, s).expect("write bench data");
}

/// Zipf-distributed pseudo-words, so BPE merges behave roughly as on natural text.
struct Words {
    vocab: Vec<String>,
    rng: Rng,
}

impl Words {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let vocab = (0..5000)
            .map(|_| {
                let len = rng.range(1, 9);
                (0..len)
                    .map(|_| (b'a' + rng.below(26) as u8) as char)
                    .collect()
            })
            .collect();
        Words { vocab, rng }
    }
    fn sentence(&mut self, n_words: usize) -> String {
        let mut s = String::new();
        for i in 0..n_words {
            let u = self.rng.uniform();
            let k = ((self.vocab.len() as f64).powf(u) as usize - 1).min(self.vocab.len() - 1);
            if i > 0 {
                s.push(if self.rng.below(12) == 0 { '\n' } else { ' ' });
            }
            s.push_str(&self.vocab[k]);
        }
        s
    }
}

/// A byte-level BPE tokenizer trained on generated text, written as a model directory.
fn train_tokenizer(dir: &Path, words: &mut Words) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let text: String = (0..20_000).map(|_| words.sentence(40) + "\n").collect();
    std::fs::write(&corpus, text).expect("write corpus");
    let trainer = BpeTrainer::builder()
        .vocab_size(8000)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train_from_files(
        &mut TrainerWrapper::BpeTrainer(trainer),
        vec![corpus.to_string_lossy().into_owned()],
    )
    .expect("train BPE");
    tok.save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");
    let cfg = r#"{"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}"#;
    std::fs::write(dir.join("tokenizer_config.json"), cfg).expect("write config");
    dir.to_path_buf()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("nopad-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!("nopad-data packing benchmark: {N_EXAMPLES} FLAN-like examples, max_len {MAX_LEN}");
    let data = instruction_dataset(&SyntheticConfig {
        n_examples: N_EXAMPLES,
        vocab_size: 32_000,
        lengths: LengthDist::FlanLike,
        max_len: MAX_LEN,
        seed: 1,
    });
    let tokens: usize = data.iter().map(Example::len).sum();

    // Loading pretokenized JSONL: parse, check, long policy.
    let file = dir.join("pretok.jsonl");
    write_pretokenized(&file, &data);
    let mut opts = LoadOptions::new(MAX_LEN);
    opts.vocab_size = Some(32_000);
    bench("load pretokenized JSONL", tokens, || {
        let (ex, _) = load_examples(&file, &opts).expect("load");
        assert_eq!(ex.len(), N_EXAMPLES);
    });

    // Packing alone, and the loader's full path (sampling + packing on its thread).
    let refs: Vec<&Example> = data.iter().collect();
    for strategy in Strategy::ALL {
        let pack = PackOptions::new(strategy, 16, MAX_LEN);
        bench(
            &format!("pack_micro_batch {strategy} (16 per batch)"),
            tokens,
            || {
                for chunk in refs.chunks(16) {
                    std::hint::black_box(pack_micro_batch(chunk, &pack));
                }
            },
        );
    }
    let shared = Arc::new(data);
    for strategy in [Strategy::Flatten, Strategy::Pad, Strategy::Offline] {
        bench(
            &format!("Loader epoch {strategy} (16 x 2 per step)"),
            tokens,
            || {
                let opts = LoaderOptions {
                    pack: PackOptions::new(strategy, 16, MAX_LEN),
                    grad_accum: 2,
                    seed: 3,
                    shuffle: true,
                    start: Default::default(),
                    prefetch: 4,
                    parallel: nopad_data::DataParallel::ALONE,
                };
                let loader = Loader::new(Arc::clone(&shared), opts).expect("loader");
                let spe = loader.steps_per_epoch();
                let n: usize = loader.take(spe).map(|s| s.stats().real_tokens).sum();
                assert_eq!(n, tokens);
            },
        );
    }

    // Loading text: tokenization dominates.
    let mut words = Words::new(7);
    let model = match std::env::var_os("NOPAD_BENCH_TOKENIZER") {
        Some(d) => PathBuf::from(d),
        None => train_tokenizer(&dir, &mut words),
    };
    let mut rng = Rng::new(11);
    let mut text = String::new();
    for _ in 0..N_EXAMPLES / 4 {
        let n = (rng.lognormal(130.0, 0.9) as usize).clamp(6, 3000);
        let prompt = words.sentence(n / 2);
        let completion = words.sentence(n - n / 2);
        let rec = serde_json::json!({"prompt": prompt, "completion": completion});
        let _ = writeln!(text, "{rec}");
    }
    let file = dir.join("text.jsonl");
    std::fs::write(&file, text).expect("write text data");
    let mut opts = LoadOptions::new(MAX_LEN);
    opts.tokenizer_dir = Some(model);
    let (ex, _) = load_examples(&file, &opts).expect("load text");
    let text_tokens: usize = ex.iter().map(Example::len).sum();
    bench(
        "load prompt-completion JSONL (BPE, all cores)",
        text_tokens,
        || {
            std::hint::black_box(load_examples(&file, &opts).expect("load text"));
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}
