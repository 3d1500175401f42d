//! Sampling: which examples form each micro-batch and each optimizer step, epoch after epoch,
//! as a pure function of (dataset, options, [`DataPosition`]).
//!
//! Determinism is the point: an epoch's order depends only on the seed and the epoch number, and
//! everything else the next step depends on (cursor into that order, a `concat` stream's offset
//! into the current example, the `offline` packer's carried examples) lives in [`DataPosition`].
//! So a run resumed from a checkpoint's position yields exactly the steps an uninterrupted run
//! would. Steps never cross an epoch; an epoch's last step may hold fewer micro-batches.
//!
//! With several data-parallel ranks the planner plans the global step (`ranks × grad_accum`
//! micro-batches, one position for every rank) and `ranks` splits it; see there.

use std::sync::Arc;

use nopad_rng::Rng;

use crate::pack::{best_fit_decreasing, cut_rows, pack_concat, pack_micro_batch, pack_rows};
use crate::pack::{PackOptions, Piece};
use crate::ranks::{self, DataParallel, RankCost};
use crate::{Batch, BatchStats, Example, Strategy};

/// Where the data stream stands: which example comes next, and what the packer carries. Store it
/// in a checkpoint; resuming from it continues exactly where the run left off.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Epoch of the next step (0-based).
    pub epoch: u64,
    /// Optimizer steps already taken in this epoch.
    pub step: u64,
    /// Index into the epoch's order of the next example not yet taken.
    pub cursor: u64,
    /// `concat` only: tokens of the example at `cursor` already emitted (its tail comes next).
    pub offset: u64,
    /// `offline` only: dataset indices of examples taken from the order but not yet emitted
    /// (they did not fill a row well enough and wait for the next window).
    pub carry: Vec<u64>,
}

/// One optimizer step's micro-batches (this rank's), and what every rank runs in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// This rank's micro-batches: `grad_accum` of them. Alone (one rank), fewer at an epoch's
    /// end; with several ranks always exactly `grad_accum`, some empty ([`Batch::is_empty`]) when
    /// the epoch's last step runs short, so every rank makes the same calls.
    pub batches: Vec<Batch>,
    /// The epoch these batches belong to.
    pub epoch: u64,
    /// Where the stream stands after this step (a checkpoint stores it; the same on every rank).
    pub position_after: DataPosition,
    /// What each rank runs in this step, indexed by rank (one entry alone).
    pub rank_costs: Vec<RankCost>,
    /// Token accounting over every rank's micro-batches; `global.target_tokens` is the loss
    /// divisor of the step, known on every rank before any forward.
    pub global: BatchStats,
    /// The balance's attention length, for [`Step::imbalance`].
    attention_len: u64,
}

impl Step {
    /// Target tokens over this rank's micro-batches (alone, the loss divisor of the step; with
    /// several ranks the divisor is `global.target_tokens`).
    pub fn target_tokens(&self) -> usize {
        self.stats().target_tokens
    }
    /// Token accounting summed over this rank's micro-batches.
    pub fn stats(&self) -> BatchStats {
        sum_stats(&self.batches)
    }
    /// The costliest rank's cost over the mean (1 alone): how long ranks wait for the slowest.
    pub fn imbalance(&self) -> f64 {
        ranks::imbalance(&self.rank_costs, self.attention_len)
    }
}

fn sum_stats(batches: &[Batch]) -> BatchStats {
    let mut s = BatchStats::default();
    for b in batches {
        s += b.stats;
    }
    s
}

/// `offline` packs at least this many examples at once (plus enough tokens for two steps).
pub const OFFLINE_WINDOW: usize = 1024;

/// Length-grouped sampling sorts megabatches of this many micro-batches by length (as HF's
/// `LengthGroupedSampler` does), so each micro-batch holds similar lengths.
const MEGABATCH: usize = 50;

/// What one micro-batch is made of, before its tokens are copied.
pub(crate) enum MicroPlan {
    /// Whole examples (`pad`, `flatten`).
    Examples(Vec<u32>),
    /// `concat` rows of at most `max_len` tokens, each one attention segment of stream pieces.
    Stream(Vec<Vec<Piece<u32>>>),
    /// `offline` rows of examples.
    Rows(Vec<Vec<u32>>),
}

/// Plans and builds steps.
pub(crate) struct Planner {
    examples: Arc<Vec<Example>>,
    pack: PackOptions,
    /// Micro-batches of the global step (all ranks').
    grad_accum: usize,
    seed: u64,
    shuffle: bool,
    order_epoch: Option<u64>,
    order: Vec<u32>,
    parallel: DataParallel,
}

impl Planner {
    pub(crate) fn new(
        examples: Arc<Vec<Example>>,
        pack: PackOptions,
        grad_accum: usize,
        seed: u64,
        shuffle: bool,
    ) -> Self {
        Planner {
            examples,
            pack,
            grad_accum,
            seed,
            shuffle,
            order_epoch: None,
            order: vec![],
            parallel: DataParallel::ALONE,
        }
    }

    /// The planner of one rank among several: it plans global steps of `ranks × grad_accum`
    /// micro-batches (`grad_accum` as given to [`Planner::new`], per rank) and hands out
    /// `rank`'s share.
    pub(crate) fn for_ranks(self, parallel: DataParallel) -> Self {
        Planner {
            grad_accum: self.grad_accum * parallel.ranks,
            parallel,
            ..self
        }
    }

    /// The epoch's example order: a seeded shuffle, then (if asked, for `pad`/`flatten`)
    /// megabatches sorted by decreasing length.
    fn order(&mut self, epoch: u64) -> &[u32] {
        if self.order_epoch != Some(epoch) {
            let mut order: Vec<u32> = (0..self.examples.len() as u32).collect();
            if self.shuffle {
                let mixed = self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Rng::derived(mixed, "data").shuffle(&mut order);
            }
            let groups = matches!(self.pack.strategy, Strategy::Pad | Strategy::Flatten);
            if self.pack.group_by_length && groups {
                let lens = |i: &u32| std::cmp::Reverse(self.examples[*i as usize].len());
                for mega in order.chunks_mut(MEGABATCH * self.pack.batch_size) {
                    mega.sort_by_key(lens);
                }
            }
            self.order = order;
            self.order_epoch = Some(epoch);
        }
        &self.order
    }

    /// The order of `epoch`, copied (for statistics).
    pub(crate) fn epoch_order(&mut self, epoch: u64) -> Vec<u32> {
        self.order(epoch).to_vec()
    }

    /// Plans the step at `pos`: its micro-batches and the position after it.
    fn plan(&mut self, pos: &DataPosition) -> (Vec<MicroPlan>, DataPosition) {
        let (bs, ga, max_len) = (self.pack.batch_size, self.grad_accum, self.pack.max_len);
        let strategy = self.pack.strategy;
        let examples = Arc::clone(&self.examples);
        let len = |i: u32| examples[i as usize].len();
        self.order(pos.epoch);
        let order = &self.order;
        let n = order.len();
        let mut next = pos.clone();
        let mut plans = vec![];
        match strategy {
            Strategy::Pad | Strategy::Flatten => {
                while plans.len() < ga && (next.cursor as usize) < n {
                    let c = next.cursor as usize;
                    let end = (c + bs).min(n);
                    plans.push(MicroPlan::Examples(order[c..end].to_vec()));
                    next.cursor = end as u64;
                }
            }
            Strategy::Concat => {
                while plans.len() < ga && (next.cursor as usize) < n {
                    let mut pieces = vec![];
                    let mut room = bs * max_len;
                    while room > 0 && (next.cursor as usize) < n {
                        let i = order[next.cursor as usize];
                        let start = next.offset as usize;
                        let end = len(i).min(start + room);
                        pieces.push(Piece {
                            example: i,
                            start,
                            end,
                        });
                        room -= end - start;
                        if end == len(i) {
                            next.cursor += 1;
                            next.offset = 0;
                        } else {
                            next.offset = end as u64;
                        }
                    }
                    plans.push(MicroPlan::Stream(cut_rows(&pieces, max_len)));
                }
            }
            Strategy::Offline => {
                let mut pool: Vec<u32> = pos.carry.iter().map(|&i| i as u32).collect();
                let mut tokens: usize = pool.iter().map(|&i| len(i)).sum();
                while (next.cursor as usize) < n
                    && (pool.len() < OFFLINE_WINDOW || tokens < 2 * bs * ga * max_len)
                {
                    let i = order[next.cursor as usize];
                    pool.push(i);
                    tokens += len(i);
                    next.cursor += 1;
                }
                let lens: Vec<usize> = pool.iter().map(|&i| len(i)).collect();
                let mut rows = best_fit_decreasing(&lens, max_len);
                let fill = |r: &Vec<usize>| r.iter().map(|&j| lens[j]).sum::<usize>();
                // Fullest rows go now; the rest wait for more examples to fill them better.
                rows.sort_by_key(|r| std::cmp::Reverse(fill(r)));
                let emit = if (next.cursor as usize) >= n && rows.len() <= bs * ga {
                    rows.len()
                } else {
                    (bs * ga).min(rows.len())
                };
                next.carry = rows[emit..]
                    .iter()
                    .flatten()
                    .map(|&j| pool[j] as u64)
                    .collect();
                for chunk in rows[..emit].chunks(bs) {
                    let rows = chunk
                        .iter()
                        .map(|r| r.iter().map(|&j| pool[j]).collect())
                        .collect();
                    plans.push(MicroPlan::Rows(rows));
                }
            }
        }
        next.step += 1;
        if next.cursor as usize >= n && next.offset == 0 && next.carry.is_empty() {
            next = DataPosition {
                epoch: pos.epoch + 1,
                ..DataPosition::default()
            };
        }
        (plans, next)
    }

    /// Builds the step at `pos`: this rank's micro-batches and every rank's costs.
    pub(crate) fn next_step(&mut self, pos: &DataPosition) -> Step {
        let (mut shares, position_after) = self.shares(pos);
        let per_rank: Vec<BatchStats> = shares.iter().map(|s| sum_stats(s)).collect();
        let mut global = BatchStats::default();
        for s in &per_rank {
            global += *s;
        }
        let rank_costs = per_rank.iter().map(RankCost::of).collect();
        Step {
            batches: std::mem::take(&mut shares[self.parallel.rank]),
            epoch: pos.epoch,
            position_after,
            rank_costs,
            global,
            attention_len: self.parallel.attention_len,
        }
    }

    /// Every rank's micro-batches of the step at `pos` (`[rank][micro-batch]`; one rank alone
    /// gets the plan unsplit), and the position after it. Each rank builds them all: the costs
    /// the step reports and the memory plan's largest micro-batch need every share, and copying
    /// the tokens is small next to a training step.
    pub(crate) fn shares(&mut self, pos: &DataPosition) -> (Vec<Vec<Batch>>, DataPosition) {
        let (plans, position_after) = self.plan(pos);
        let (p, strategy) = (&self.parallel, self.pack.strategy);
        let shares = if p.ranks == 1 {
            vec![plans]
        } else {
            ranks::split(
                plans,
                strategy,
                &self.examples,
                p,
                self.grad_accum / p.ranks,
            )
        };
        let built = shares
            .iter()
            .map(|share| share.iter().map(|p| self.build(p)).collect())
            .collect();
        (built, position_after)
    }

    /// Copies one micro-batch's tokens into a [`Batch`].
    fn build(&self, plan: &MicroPlan) -> Batch {
        let ex = |i: &u32| &self.examples[*i as usize];
        match plan {
            MicroPlan::Examples(ids) => {
                let refs: Vec<&Example> = ids.iter().map(ex).collect();
                pack_micro_batch(&refs, &self.pack)
            }
            MicroPlan::Stream(rows) => {
                let rows: Vec<Vec<Piece<&Example>>> = rows
                    .iter()
                    .map(|row| {
                        row.iter()
                            .map(|p| Piece {
                                example: ex(&p.example),
                                start: p.start,
                                end: p.end,
                            })
                            .collect()
                    })
                    .collect();
                pack_concat(&rows)
            }
            MicroPlan::Rows(rows) => {
                let rows: Vec<Vec<&Example>> =
                    rows.iter().map(|r| r.iter().map(ex).collect()).collect();
                pack_rows(&rows)
            }
        }
    }

    /// Whether `pos` can be a position of this dataset and strategy.
    pub(crate) fn fits(&mut self, pos: &DataPosition) -> bool {
        let strategy = self.pack.strategy;
        let n = self.examples.len() as u64;
        let examples = Arc::clone(&self.examples);
        let order = self.order(pos.epoch);
        let offset_ok = pos.offset == 0
            || (strategy == Strategy::Concat
                && pos.cursor < n
                && (pos.offset as usize) < examples[order[pos.cursor as usize] as usize].len());
        let carry_ok = pos.carry.is_empty()
            || (strategy == Strategy::Offline && pos.carry.iter().all(|&i| i < n));
        pos.cursor <= n && offset_ok && carry_ok
    }

    /// Optimizer steps in `epoch` (planned, not built).
    pub(crate) fn steps_in_epoch(&mut self, epoch: u64) -> usize {
        let n = self.examples.len();
        let (bs, ga) = (self.pack.batch_size, self.grad_accum);
        match self.pack.strategy {
            Strategy::Pad | Strategy::Flatten => n.div_ceil(bs).div_ceil(ga),
            Strategy::Concat => {
                let tokens: usize = self.examples.iter().map(|e| e.len()).sum();
                tokens.div_ceil(bs * self.pack.max_len * ga)
            }
            Strategy::Offline => {
                let mut pos = DataPosition {
                    epoch,
                    ..DataPosition::default()
                };
                let mut steps = 0;
                while pos.epoch == epoch {
                    pos = self.plan(&pos).1;
                    steps += 1;
                }
                steps
            }
        }
    }
}
