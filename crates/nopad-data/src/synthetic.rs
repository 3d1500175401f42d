//! Built-in synthetic instruction data: no files, no tokenizer, learnable, seeded.
//!
//! Each example is `[BOS] prompt [SEP] response [EOS]`, where the response is the prompt
//! reversed, so a model can learn it and the loss must fall. Content tokens follow a Zipf law
//! (rank r has weight 1/(r+1)), as words in text do: a model first learns the unigram
//! distribution (a quick, visible fall from ln V), then to copy from the prompt. Only the
//! response and EOS are targets. Total lengths follow the lognormal fits of the padding-free
//! packing paper's datasets (FLAN-like median 180, σ 0.9; OrcaMath-like median 550, σ 0.6),
//! clamped to `[8, max_len]`.

use nopad_rng::Rng;

use crate::{Example, IGNORE_INDEX};

/// Padding token id of the synthetic vocabulary.
pub const PAD: i32 = 0;
/// Beginning-of-sequence token id.
pub const BOS: i32 = 1;
/// End-of-sequence token id (a target: the model must learn to stop).
pub const EOS: i32 = 2;
/// Separator between prompt and response.
pub const SEP: i32 = 3;
/// First content token id; content is drawn from `[FIRST_CONTENT, vocab_size)`.
pub const FIRST_CONTENT: i32 = 4;
/// Shortest example generated.
pub const MIN_LEN: usize = 8;

/// Which dataset's length distribution to imitate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LengthDist {
    /// Short, high variance: lognormal, median 180 tokens, σ 0.9.
    FlanLike,
    /// Longer, lower variance: lognormal, median 550 tokens, σ 0.6.
    OrcaMathLike,
}

impl LengthDist {
    /// `(median, sigma)` of the lognormal total length.
    pub fn params(self) -> (f64, f64) {
        match self {
            LengthDist::FlanLike => (180.0, 0.9),
            LengthDist::OrcaMathLike => (550.0, 0.6),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    /// Number of examples.
    pub n_examples: usize,
    /// Vocabulary size (at least 5: four special ids and one content id).
    pub vocab_size: usize,
    /// Length distribution.
    pub lengths: LengthDist,
    /// Longest example; lengths are clamped to `[8, max_len]`.
    pub max_len: usize,
    /// Seed; equal configs give equal datasets.
    pub seed: u64,
}

/// Generates the dataset. Lengths are clamped to `[MIN_LEN, max_len]` (to `max_len` alone when it
/// is shorter than `MIN_LEN`); with `[BOS] p [SEP] p' [EOS]` an odd remainder is dropped, so an
/// example may be one token shorter than its drawn length.
///
/// # Panics
/// If `vocab_size < 5` or `max_len < 5`: no example can be built (callers validate their
/// configuration first).
pub fn instruction_dataset(cfg: &SyntheticConfig) -> Vec<Example> {
    assert!(
        cfg.vocab_size > FIRST_CONTENT as usize,
        "vocab_size must be at least 5"
    );
    assert!(
        cfg.max_len >= 5,
        "max_len must be at least 5 for [BOS] p [SEP] p' [EOS]"
    );
    let mut rng = Rng::derived(cfg.seed, "synthetic");
    let (median, sigma) = cfg.lengths.params();
    let n_content = cfg.vocab_size - FIRST_CONTENT as usize;
    let mut cdf: Vec<f64> = (0..n_content).map(|r| 1.0 / (r + 1) as f64).collect();
    for i in 1..n_content {
        cdf[i] += cdf[i - 1];
    }
    let total = cdf[n_content - 1];
    (0..cfg.n_examples)
        .map(|_| {
            let drawn = rng.lognormal(median, sigma).round() as usize;
            let len = drawn.clamp(MIN_LEN.min(cfg.max_len), cfg.max_len);
            let p = (len - 3) / 2;
            let prompt: Vec<i32> = (0..p)
                .map(|_| {
                    let u = rng.uniform() * total;
                    let rank = cdf.partition_point(|&c| c <= u).min(n_content - 1);
                    FIRST_CONTENT + rank as i32
                })
                .collect();
            let mut input_ids = Vec::with_capacity(2 * p + 3);
            input_ids.push(BOS);
            input_ids.extend_from_slice(&prompt);
            input_ids.push(SEP);
            input_ids.extend(prompt.iter().rev());
            input_ids.push(EOS);
            let mut labels = vec![IGNORE_INDEX; p + 2];
            labels.extend_from_slice(&input_ids[p + 2..]);
            Example { input_ids, labels }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lengths: LengthDist, max_len: usize) -> SyntheticConfig {
        SyntheticConfig {
            n_examples: 4000,
            vocab_size: 512,
            lengths,
            max_len,
            seed: 5,
        }
    }

    #[test]
    fn examples_are_well_formed_and_learnable() {
        let data = instruction_dataset(&cfg(LengthDist::FlanLike, 256));
        assert_eq!(data.len(), 4000);
        for e in &data {
            let p = (e.len() - 3) / 2;
            assert!(e.len() >= 7 && e.len() <= 256, "len {}", e.len());
            assert_eq!((e.input_ids[0], e.input_ids[p + 1]), (BOS, SEP));
            assert_eq!(*e.input_ids.last().unwrap(), EOS);
            let (prompt, resp) = (&e.input_ids[1..p + 1], &e.input_ids[p + 2..2 * p + 2]);
            assert!(prompt.iter().rev().eq(resp.iter()));
            assert!(e.input_ids.iter().all(|&t| (0..512).contains(&t)));
            assert!(e.labels[..p + 2].iter().all(|&l| l == IGNORE_INDEX));
            assert_eq!(&e.labels[p + 2..], &e.input_ids[p + 2..]);
            assert_eq!(e.target_tokens(), p + 1);
        }
        assert_eq!(data, instruction_dataset(&cfg(LengthDist::FlanLike, 256)));
    }

    #[test]
    fn median_lengths_follow_the_anchors() {
        for (dist, want) in [
            (LengthDist::FlanLike, 180.0),
            (LengthDist::OrcaMathLike, 550.0),
        ] {
            let mut lens: Vec<usize> = instruction_dataset(&cfg(dist, 1 << 16))
                .iter()
                .map(|e| e.len())
                .collect();
            lens.sort();
            let median = lens[lens.len() / 2] as f64;
            assert!(
                (median - want).abs() / want < 0.06,
                "{dist:?}: median {median}"
            );
        }
    }
}
