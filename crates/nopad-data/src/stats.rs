//! Dataset statistics: what every packing strategy would do with a dataset, before training.
//!
//! [`strategy_stats`] plans one epoch (epoch 0, the loader's own seeded order) under each
//! strategy and counts rows, steps, real and pad tokens, Σlen² and the speed-up over `pad` the
//! token counts predict. [`StatsReport`] renders it as text or as one JSON object keyed by
//! strategy name; `plot.rs` draws its length histogram.

use std::fmt;
use std::sync::Arc;

use serde_json::json;

use crate::load::LoadReport;
use crate::pack::{PackOptions, CONCAT_WARNING};
use crate::sampler::{DataPosition, Planner};
use crate::{BatchStats, Example, Strategy};

/// Seed of the epoch the statistics plan (the counts barely depend on it).
const STATS_SEED: u64 = 0;

/// One strategy's epoch, counted.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategyStats {
    /// The strategy.
    pub strategy: Strategy,
    /// Rows laid out (one per example for `pad`, one per micro-batch for `flatten`).
    pub rows: usize,
    /// Micro-batches per epoch.
    pub micro_batches: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: usize,
    /// Tokens of examples.
    pub real_tokens: usize,
    /// Padding tokens.
    pub pad_tokens: usize,
    /// Target tokens (for `concat` these include the wrong cross-example targets).
    pub target_tokens: usize,
    /// Σ over attention segments of len²: the attention cost.
    pub sum_len_sq: u64,
    /// Examples truncated at load.
    pub truncated: usize,
    /// Examples split at load, plus (`concat`) examples cut across rows.
    pub split: usize,
    /// Examples dropped at load.
    pub dropped: usize,
    /// Speed-up over `pad` if time is proportional to tokens processed (real + pad): the
    /// prediction of the token counts alone, ignoring the Σlen² attention term.
    pub predicted_speedup: f64,
}

impl StrategyStats {
    /// Pad tokens over all tokens processed.
    pub fn padding_fraction(&self) -> f64 {
        let total = self.real_tokens + self.pad_tokens;
        if total == 0 {
            0.0
        } else {
            self.pad_tokens as f64 / total as f64
        }
    }
}

/// Distribution of example lengths.
#[derive(Clone, Debug, PartialEq)]
pub struct LengthHistogram {
    /// Width of each bin; bin i holds lengths in `[i * width, (i + 1) * width)`, the last bin
    /// also longer ones when [`LengthHistogram::open_ended`].
    pub bin_width: usize,
    /// Examples per bin.
    pub counts: Vec<usize>,
    /// Shortest example.
    pub min: usize,
    /// Median length.
    pub median: usize,
    /// Mean length.
    pub mean: f64,
    /// 90th percentile.
    pub p90: usize,
    /// Longest example.
    pub max: usize,
}

/// Bins of a histogram at most; longer tails go into an open-ended last bin.
const MAX_BINS: usize = 30;

impl LengthHistogram {
    /// About 20 bins of a round width covering the 99th percentile; lengths beyond the last bin
    /// are counted in it (see [`LengthHistogram::open_ended`]).
    pub fn new(lens: &[usize]) -> Self {
        let mut sorted = lens.to_vec();
        sorted.sort_unstable();
        let at = |q: f64| {
            let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted.get(i).copied().unwrap_or(0)
        };
        let max = sorted.last().copied().unwrap_or(0);
        let raw = (at(0.99) / 20).max(1);
        let bin_width = [1, 2, 5]
            .iter()
            .flat_map(|&m| (0..12).map(move |e| m * 10usize.pow(e)))
            .filter(|&w| w >= raw)
            .min()
            .unwrap_or(raw);
        let mut counts = vec![0; (max / bin_width + 1).min(MAX_BINS)];
        for &l in &sorted {
            counts[(l / bin_width).min(MAX_BINS - 1)] += 1;
        }
        LengthHistogram {
            bin_width,
            counts,
            min: sorted.first().copied().unwrap_or(0),
            median: at(0.5),
            mean: sorted.iter().sum::<usize>() as f64 / sorted.len().max(1) as f64,
            p90: at(0.9),
            max,
        }
    }

    /// Whether the last bin also holds every longer length (a long tail).
    pub fn open_ended(&self) -> bool {
        self.max >= self.counts.len() * self.bin_width
    }
}

/// What each strategy would do with a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsReport {
    /// Examples in the dataset.
    pub n_examples: usize,
    /// Longest example / row length.
    pub max_len: usize,
    /// Examples (rows for `concat`/`offline`) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Length distribution.
    pub histogram: LengthHistogram,
    /// One entry per strategy, in [`Strategy::ALL`] order.
    pub strategies: Vec<StrategyStats>,
}

/// Plans one epoch of `examples` under every strategy (`opts.strategy` is ignored).
pub fn strategy_stats(examples: &[Example], opts: &PackOptions, grad_accum: usize) -> StatsReport {
    let data = Arc::new(examples.to_vec());
    let bs = opts.batch_size.max(1);
    let ga = grad_accum.max(1);
    let max_len = opts.max_len.max(1);
    let mut strategies: Vec<StrategyStats> = Strategy::ALL
        .iter()
        .map(|&strategy| {
            let pack = PackOptions {
                strategy,
                batch_size: bs,
                max_len,
                ..opts.clone()
            };
            let mut planner = Planner::new(Arc::clone(&data), pack, ga, STATS_SEED, true);
            let (mut sum, mut micro, mut steps) = (BatchStats::default(), 0, 0);
            let mut pos = DataPosition::default();
            while pos.epoch == 0 && !data.is_empty() {
                let step = planner.next_step(&pos);
                micro += step.batches.len();
                sum += step.stats();
                steps += 1;
                pos = step.position_after;
            }
            let split = if strategy == Strategy::Concat {
                cut_examples(&data, &planner.epoch_order(0), max_len)
            } else {
                0
            };
            StrategyStats {
                strategy,
                rows: sum.rows,
                micro_batches: micro,
                steps_per_epoch: steps,
                real_tokens: sum.real_tokens,
                pad_tokens: sum.pad_tokens,
                target_tokens: sum.target_tokens,
                sum_len_sq: sum.sum_len_sq,
                truncated: 0,
                split,
                dropped: 0,
                predicted_speedup: 1.0,
            }
        })
        .collect();
    let pad_total = strategies[0].real_tokens + strategies[0].pad_tokens;
    for s in &mut strategies {
        let total = s.real_tokens + s.pad_tokens;
        s.predicted_speedup = if total == 0 {
            1.0
        } else {
            pad_total as f64 / total as f64
        };
    }
    let lens: Vec<usize> = examples.iter().map(Example::len).collect();
    StatsReport {
        n_examples: examples.len(),
        max_len,
        batch_size: bs,
        grad_accum: ga,
        histogram: LengthHistogram::new(&lens),
        strategies,
    }
}

/// Examples that `concat` cuts across a row boundary: its rows are consecutive `max_len` slices
/// of the epoch's token stream.
fn cut_examples(data: &[Example], order: &[u32], max_len: usize) -> usize {
    let mut at = 0;
    let mut cut = 0;
    for &i in order {
        let len = data[i as usize].len();
        if len > 0 && at / max_len != (at + len - 1) / max_len {
            cut += 1;
        }
        at += len;
    }
    cut
}

impl StatsReport {
    /// Adds what loading did (truncated, split, dropped) to every strategy's counts.
    pub fn add_load_report(&mut self, r: &LoadReport) {
        for s in &mut self.strategies {
            s.truncated += r.truncated;
            s.split += r.split;
            s.dropped += r.dropped;
        }
    }

    /// The entry of one strategy.
    pub fn get(&self, strategy: Strategy) -> &StrategyStats {
        self.strategies
            .iter()
            .find(|s| s.strategy == strategy)
            .expect("a report holds every strategy")
    }

    /// One JSON object keyed by strategy name.
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .strategies
            .iter()
            .map(|s| {
                let v = json!({
                    "rows": s.rows,
                    "steps_per_epoch": s.steps_per_epoch,
                    "real_tokens": s.real_tokens,
                    "pad_tokens": s.pad_tokens,
                    "padding_fraction": s.padding_fraction(),
                    "sum_len_sq": s.sum_len_sq,
                    "truncated": s.truncated,
                    "split": s.split,
                    "dropped": s.dropped,
                    "predicted_speedup": s.predicted_speedup,
                });
                (s.strategy.name().to_string(), v)
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.histogram;
        writeln!(
            f,
            "{} examples; max_len {}, batch_size {}, grad_accum {}",
            self.n_examples, self.max_len, self.batch_size, self.grad_accum
        )?;
        writeln!(
            f,
            "lengths: min {}, median {}, mean {:.1}, p90 {}, max {}",
            h.min, h.median, h.mean, h.p90, h.max
        )?;
        let top = h.counts.iter().copied().max().unwrap_or(0).max(1);
        for (i, &c) in h.counts.iter().enumerate() {
            let (lo, hi) = (i * h.bin_width, (i + 1) * h.bin_width - 1);
            let bar = "#".repeat((c * 50).div_ceil(top));
            let range = if i + 1 == h.counts.len() && h.open_ended() {
                format!("{lo:>6}+      ")
            } else {
                format!("{lo:>6}-{hi:<6}")
            };
            writeln!(f, "  {range} {c:>8} {bar}")?;
        }
        writeln!(
            f,
            "\n{:<8} {:>9} {:>11} {:>12} {:>12} {:>8} {:>15} {:>9} {:>6} {:>7} {:>9}",
            "strategy",
            "rows",
            "steps/epoch",
            "real tokens",
            "pad tokens",
            "padding",
            "sum len^2",
            "truncated",
            "split",
            "dropped",
            "speed-up"
        )?;
        for s in &self.strategies {
            writeln!(
                f,
                "{:<8} {:>9} {:>11} {:>12} {:>12} {:>7.1}% {:>15} {:>9} {:>6} {:>7} {:>8.2}x",
                s.strategy.name(),
                s.rows,
                s.steps_per_epoch,
                s.real_tokens,
                s.pad_tokens,
                100.0 * s.padding_fraction(),
                s.sum_len_sq,
                s.truncated,
                s.split,
                s.dropped,
                s.predicted_speedup
            )?;
        }
        let (pad, off) = (self.get(Strategy::Pad), self.get(Strategy::Offline));
        writeln!(
            f,
            "\noffline: {} optimizer steps per epoch against {} with pad and flatten ({:.2}x): \
             it changes the schedule, flatten does not",
            off.steps_per_epoch,
            pad.steps_per_epoch,
            off.steps_per_epoch as f64 / pad.steps_per_epoch.max(1) as f64
        )?;
        writeln!(f, "speed-up: real+pad tokens of pad / those of the strategy (ignores attention's sum len^2 term)")?;
        write!(f, "warning: {CONCAT_WARNING}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize) -> Example {
        Example {
            input_ids: vec![5; len],
            labels: vec![5; len],
        }
    }

    #[test]
    fn counts_match_hand_computed_epochs() {
        let data: Vec<Example> = [1usize, 2, 3, 4, 5, 6, 7, 8]
            .iter()
            .map(|&l| ex(l))
            .collect();
        let r = strategy_stats(&data, &PackOptions::new(Strategy::Flatten, 2, 8), 2);
        let (pad, flat) = (r.get(Strategy::Pad), r.get(Strategy::Flatten));
        assert_eq!((pad.rows, pad.steps_per_epoch, pad.real_tokens), (8, 2, 36));
        assert_eq!(
            (flat.rows, flat.steps_per_epoch, flat.pad_tokens),
            (4, 2, 0)
        );
        assert_eq!(flat.sum_len_sq, (1..=8u64).map(|l| l * l).sum::<u64>());
        assert!(
            pad.pad_tokens > 0
                && (flat.predicted_speedup - (36 + pad.pad_tokens) as f64 / 36.0).abs() < 1e-12
        );
        let concat = r.get(Strategy::Concat);
        assert_eq!(
            (concat.rows, concat.real_tokens, concat.pad_tokens),
            (5, 36, 0)
        );
        assert_eq!(concat.sum_len_sq, 4 * 64 + 16);
        let off = r.get(Strategy::Offline);
        // 36 tokens in rows of 8: five rows at best; BFD finds them.
        assert_eq!((off.rows, off.steps_per_epoch, off.real_tokens), (5, 2, 36));
        let j = r.to_json();
        for s in ["pad", "concat", "flatten", "offline"] {
            for k in [
                "rows",
                "steps_per_epoch",
                "real_tokens",
                "pad_tokens",
                "padding_fraction",
                "sum_len_sq",
                "truncated",
                "split",
                "dropped",
                "predicted_speedup",
            ] {
                assert!(j[s].get(k).is_some(), "{s}.{k} missing");
            }
        }
        let text = r.to_string();
        assert!(
            text.contains("offline: 2 optimizer steps per epoch against 2"),
            "{text}"
        );
    }

    #[test]
    fn histogram_bins_are_round_and_complete() {
        let h = LengthHistogram::new(&[1, 50, 99, 100, 180, 700]);
        assert_eq!(h.bin_width, 50);
        assert_eq!(h.counts.iter().sum::<usize>(), 6);
        assert_eq!(
            (h.min, h.max, h.counts[0], h.counts[1], h.counts[2]),
            (1, 700, 1, 2, 1)
        );
        assert!(!h.open_ended());
        // A long tail beyond the 99th percentile lands in an open-ended last bin.
        let mut lens: Vec<usize> = (0..1000).map(|i| i % 200).collect();
        lens.push(100_000);
        let h = LengthHistogram::new(&lens);
        assert_eq!((h.bin_width, h.counts.len()), (10, MAX_BINS));
        assert!(h.open_ended() && h.counts[MAX_BINS - 1] == 1);
        assert_eq!(h.counts.iter().sum::<usize>(), 1001);
    }
}
