//! Data parallelism's share of the data: how one global optimizer step is split over the ranks.
//!
//! The sampler plans the global step exactly as one rank with `ranks × grad_accum` micro-batches
//! would (same examples, same [`DataPosition`](crate::DataPosition) after it, so a checkpoint's
//! position means the same thing at any world size). This module then re-deals that step's units
//! (examples for `pad` and `flatten`, whole rows for `concat` and `offline`) into `ranks` shares
//! of exactly `grad_accum` micro-batches each, so that every rank runs the same number of forward
//! and backward calls (a rank with nothing left gets empty micro-batches, never fewer) and the
//! ranks' costs are close. The split is a pure function of the global step: every rank computes
//! it on its own and gets the same answer, with integer costs so no rounding can differ.

use std::collections::BTreeSet;

use crate::error::DataError;
use crate::pack::Piece;
use crate::sampler::MicroPlan;
use crate::{BatchStats, Example, Strategy};

/// The length at which an example's attention costs as much as its linear layers when the model
/// is not known: the balance's cost of an example of length L is `L + L²/attention_len`.
///
/// Why this shape: per layer, a Llama block's projections and MLP cost about `24·L·d²` FLOPs for
/// L tokens (hidden size d, MLP about 8/3·d), causal attention about `2·L²·d`; so the cost is
/// proportional to `L + L²/(12·d)` in FLOPs, and to about `L + L²/(6·d)` in time, since varlen
/// attention kernels run at roughly half the rate of the GEMMs. 4096 is `6·d` for d ≈ 700 and a
/// middle ground for the 0.1B to 1B models this engine is tuned on; a caller that knows the model
/// passes `6 × hidden_size`.
pub const DEFAULT_ATTENTION_LEN: u64 = 4096;

/// Where a loader sits in a data-parallel run. Each rank runs its own loader with its own
/// `rank`; a global step is what one rank with `ranks × grad_accum` micro-batches would take,
/// split into `ranks` balanced shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataParallel {
    /// World size (1 alone).
    pub ranks: usize,
    /// This rank, 0-based, below `ranks`.
    pub rank: usize,
    /// The length at which an example's attention costs as much as its linear layers, for
    /// balancing ranks ([`DEFAULT_ATTENTION_LEN`] when the model is not known). Unused alone.
    pub attention_len: u64,
}

impl DataParallel {
    /// One rank alone: the split is skipped and steps are exactly the planner's.
    pub const ALONE: DataParallel = DataParallel {
        ranks: 1,
        rank: 0,
        attention_len: DEFAULT_ATTENTION_LEN,
    };

    /// Rank `rank` of `ranks`, balanced with [`DEFAULT_ATTENTION_LEN`].
    pub fn new(ranks: usize, rank: usize) -> DataParallel {
        DataParallel {
            ranks,
            rank,
            ..DataParallel::ALONE
        }
    }

    /// Checks what a user (or a launcher's environment) can get wrong.
    pub(crate) fn check(&self) -> Result<(), DataError> {
        if self.ranks == 0 || self.rank >= self.ranks {
            return Err(DataError::msg(format!(
                "rank {} of {} ranks: the world size (`ranks`) must be at least 1 and the rank \
                 0-based below it (check RANK and WORLD_SIZE)",
                self.rank, self.ranks
            )));
        }
        if self.attention_len == 0 {
            return Err(DataError::msg(
                "attention_len must be at least 1 (it is the length at which attention costs \
                 as much as the linear layers; 6 × hidden_size is a good value)",
            ));
        }
        Ok(())
    }

    /// An example (or row segment) of `len` tokens, costed `len·c + len²`: the documented cost
    /// `len + len²/c` scaled by c, in integers so every rank orders units identically.
    fn cost(&self, len: usize) -> u64 {
        let l = len as u64;
        l * self.attention_len + l * l
    }
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel::ALONE
    }
}

/// What one rank runs in a step: the numbers its time depends on and its share of the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RankCost {
    /// Tokens laid out (real and padding): what the linear layers process.
    pub tokens: usize,
    /// Σ over attention segments of len² (what the attention kernels pay).
    pub sum_len_sq: u64,
    /// Target tokens (its part of the global loss divisor).
    pub target_tokens: usize,
}

impl RankCost {
    /// The cost of a rank whose micro-batches sum to `stats`.
    pub fn of(stats: &BatchStats) -> RankCost {
        RankCost {
            tokens: stats.real_tokens + stats.pad_tokens,
            sum_len_sq: stats.sum_len_sq,
            target_tokens: stats.target_tokens,
        }
    }

    /// `tokens + sum_len_sq / attention_len`, in token-equivalents.
    pub fn cost(&self, attention_len: u64) -> f64 {
        self.tokens as f64 + self.sum_len_sq as f64 / attention_len.max(1) as f64
    }
}

/// The largest rank cost over the mean (1 when perfectly balanced or when nothing runs).
pub fn imbalance(costs: &[RankCost], attention_len: u64) -> f64 {
    let each: Vec<f64> = costs.iter().map(|c| c.cost(attention_len)).collect();
    let mean = each.iter().sum::<f64>() / each.len().max(1) as f64;
    if mean > 0.0 {
        each.iter().copied().fold(0.0, f64::max) / mean
    } else {
        1.0
    }
}

/// Splits the global step's micro-plans into `r.ranks` shares of exactly `grad_accum`
/// micro-plans each (`[rank][micro-batch]`).
///
/// Units are dealt to ranks by [`deal`] on their costs. Within a rank, `pad` takes its units
/// longest first in consecutive chunks (similar lengths share a micro-batch: less padding);
/// the other strategies deal them again over the micro-batches (even micro-batches: a smaller
/// largest micro-batch, which sizes the activations). Either way each micro-batch gets at most
/// `batch_size` units, because the global step holds at most `ranks × grad_accum × batch_size`.
pub(crate) fn split(
    plans: Vec<MicroPlan>,
    strategy: Strategy,
    examples: &[Example],
    r: &DataParallel,
    grad_accum: usize,
) -> Vec<Vec<MicroPlan>> {
    let split = Split {
        r,
        grad_accum,
        contiguous: strategy == Strategy::Pad,
    };
    match strategy {
        Strategy::Pad | Strategy::Flatten => {
            let ids: Vec<u32> = plans
                .into_iter()
                .flat_map(|p| match p {
                    MicroPlan::Examples(ids) => ids,
                    _ => unreachable!("pad and flatten plan examples"),
                })
                .collect();
            let costs = ids.iter().map(|&i| r.cost(examples[i as usize].len()));
            split.assign(&ids, costs.collect(), MicroPlan::Examples)
        }
        Strategy::Concat => {
            let rows: Vec<Vec<Piece<u32>>> = plans
                .into_iter()
                .flat_map(|p| match p {
                    MicroPlan::Stream(rows) => rows,
                    _ => unreachable!("concat plans stream rows"),
                })
                .collect();
            // A concat row is one attention segment.
            let seg = |row: &Vec<Piece<u32>>| r.cost(row.iter().map(|p| p.end - p.start).sum());
            let costs = rows.iter().map(seg).collect();
            split.assign(&rows, costs, MicroPlan::Stream)
        }
        Strategy::Offline => {
            let rows: Vec<Vec<u32>> = plans
                .into_iter()
                .flat_map(|p| match p {
                    MicroPlan::Rows(rows) => rows,
                    _ => unreachable!("offline plans rows"),
                })
                .collect();
            // An offline row holds one attention segment per example.
            let row_cost = |row: &Vec<u32>| -> u64 {
                row.iter()
                    .map(|&i| r.cost(examples[i as usize].len()))
                    .sum()
            };
            let costs = rows.iter().map(row_cost).collect();
            split.assign(&rows, costs, MicroPlan::Rows)
        }
    }
}

/// How one step is split: over which ranks, into how many micro-batches each, and whether a
/// rank's micro-batches are consecutive runs of its units (`pad`).
struct Split<'a> {
    r: &'a DataParallel,
    grad_accum: usize,
    contiguous: bool,
}

impl Split<'_> {
    /// Deals `units` to ranks, then each rank's to its micro-batches, and wraps each one.
    fn assign<T: Clone>(
        &self,
        units: &[T],
        costs: Vec<u64>,
        wrap: fn(Vec<T>) -> MicroPlan,
    ) -> Vec<Vec<MicroPlan>> {
        deal(&costs, self.r.ranks)
            .into_iter()
            .map(|mine| {
                let micro = if self.contiguous {
                    chunk_evenly(mine.len(), self.grad_accum)
                } else {
                    let my_costs: Vec<u64> = mine.iter().map(|&u| costs[u]).collect();
                    deal(&my_costs, self.grad_accum)
                };
                micro
                    .into_iter()
                    .map(|m| wrap(m.into_iter().map(|j| units[mine[j]].clone()).collect()))
                    .collect()
            })
            .collect()
    }
}

/// Longest-processing-time with equal counts: items (by index into `costs`) dealt into `bins`
/// bins, costliest first, each to the least loaded bin that may still take one; bins end with
/// `n / bins` or `n / bins + 1` items (the first `n % bins` to fill up take the extra one). Ties go
/// to the lower index, so the result is deterministic. Each bin lists its items in the order
/// dealt (costliest first).
fn deal(costs: &[u64], bins: usize) -> Vec<Vec<usize>> {
    let n = costs.len();
    let (q, extra) = (n / bins, n % bins);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]).then(a.cmp(&b)));
    let mut out: Vec<Vec<usize>> = vec![vec![]; bins];
    // (load, bin) of the bins that may take another item: the first is the least loaded.
    let mut open: BTreeSet<(u64, usize)> = (0..bins).map(|b| (0, b)).collect();
    let mut big = 0; // bins that hold q + 1
    for i in order {
        // Bins close at q + 1, and at q once `extra` bins hold q + 1: the open ones hold room
        // for exactly the items still to deal, so one is always open.
        let (load, b) = open
            .pop_first()
            .expect("an equal-count deal has an open bin");
        out[b].push(i);
        let count = out[b].len();
        if count == q + 1 {
            big += 1;
            if big == extra {
                open.retain(|&(_, o)| out[o].len() < q);
            }
        } else if count < q || big < extra {
            open.insert((load + costs[i], b));
        }
    }
    out
}

/// `n` items in `parts` consecutive chunks whose sizes differ by at most one, the larger first
/// (empty chunks last when `n < parts`).
fn chunk_evenly(n: usize, parts: usize) -> Vec<Vec<usize>> {
    let (q, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|p| {
            let len = q + usize::from(p < extra);
            start += len;
            (start - len..start).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nopad_rng::Rng;

    #[test]
    fn deal_keeps_counts_equal_and_every_item_once() {
        let mut rng = Rng::new(5);
        for n in 0..40 {
            for bins in 1..7 {
                let costs: Vec<u64> = (0..n).map(|_| rng.below(1000)).collect();
                let out = deal(&costs, bins);
                assert_eq!(out.len(), bins);
                let mut all: Vec<usize> = out.iter().flatten().copied().collect();
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n} bins {bins}");
                let counts: Vec<usize> = out.iter().map(Vec::len).collect();
                let (lo, hi) = (counts.iter().min(), counts.iter().max());
                assert!(
                    hi.unwrap() - lo.unwrap() <= 1,
                    "n {n} bins {bins}: {counts:?}"
                );
                assert_eq!(deal(&costs, bins), out, "deterministic");
            }
        }
    }

    #[test]
    fn deal_is_longest_processing_time_on_a_known_case() {
        // Costs 9 7 6 5 4 3 into 2 bins of 3: 9→a, 7→b, 6→b (13), 5→a (14), 4→b (17, full),
        // 3→a (17, full).
        let out = deal(&[5, 9, 3, 7, 4, 6], 2);
        assert_eq!(out, vec![vec![1, 0, 2], vec![3, 5, 4]]);
        // Equal counts beat plain LPT: one huge item cannot leave its bin with one item.
        let out = deal(&[100, 1, 1, 1], 2);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 2]);
    }

    #[test]
    fn chunks_are_even_and_consecutive() {
        assert_eq!(
            chunk_evenly(7, 3),
            vec![vec![0, 1, 2], vec![3, 4], vec![5, 6]]
        );
        assert_eq!(chunk_evenly(1, 3), vec![vec![0], vec![], vec![]]);
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        let rc = |tokens, sum_len_sq| RankCost {
            tokens,
            sum_len_sq,
            target_tokens: 0,
        };
        // Costs 10 + 400/4 = 110 and 50 + 0 = 50: mean 80.
        let got = imbalance(&[rc(10, 400), rc(50, 0)], 4);
        assert!((got - 110.0 / 80.0).abs() < 1e-12, "{got}");
        assert_eq!(imbalance(&[rc(0, 0), rc(0, 0)], 4), 1.0);
    }

    #[test]
    fn rank_checks_name_the_rank_and_world_size() {
        let msg = DataParallel::new(2, 2).check().unwrap_err().to_string();
        assert!(msg.contains("rank 2 of 2 ranks"), "{msg}");
        assert!(DataParallel::new(0, 0).check().is_err());
        let no_len = DataParallel {
            attention_len: 0,
            ..DataParallel::ALONE
        };
        assert!(no_len
            .check()
            .unwrap_err()
            .to_string()
            .contains("attention_len"));
        assert!(DataParallel::new(3, 2).check().is_ok());
    }
}
