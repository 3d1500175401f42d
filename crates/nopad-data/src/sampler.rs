//! Sampling: which examples form each micro-batch and each optimizer step, epoch after epoch,
//! as a pure function of (dataset, options, [`DataPosition`]).
//!
//! Determinism is the point: an epoch's order depends only on the seed and the epoch number, and
//! everything else the next step depends on (cursor into that order, a `concat` stream's offset
//! into the current example, the `offline` packer's carried examples) lives in [`DataPosition`].
//! So a run resumed from a checkpoint's position yields exactly the steps an uninterrupted run
//! would. Steps never cross an epoch; an epoch's last step may hold fewer micro-batches.

use std::sync::Arc;

use nopad_rng::Rng;

use crate::pack::{best_fit_decreasing, cut_rows, pack_concat, pack_micro_batch, pack_rows};
use crate::pack::{PackOptions, Piece};
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

/// One optimizer step's micro-batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// `grad_accum` micro-batches, fewer at an epoch's end.
    pub batches: Vec<Batch>,
    /// The epoch these batches belong to.
    pub epoch: u64,
    /// Where the stream stands after this step (a checkpoint stores it).
    pub position_after: DataPosition,
}

impl Step {
    /// Target tokens over all micro-batches: the loss divisor of the step.
    pub fn target_tokens(&self) -> usize {
        self.batches.iter().map(|b| b.stats.target_tokens).sum()
    }
    /// Token accounting summed over the micro-batches.
    pub fn stats(&self) -> BatchStats {
        let mut s = BatchStats::default();
        for b in &self.batches {
            s += b.stats;
        }
        s
    }
}

/// `offline` packs at least this many examples at once (plus enough tokens for two steps).
pub const OFFLINE_WINDOW: usize = 1024;

/// Length-grouped sampling sorts megabatches of this many micro-batches by length (as HF's
/// `LengthGroupedSampler` does), so each micro-batch holds similar lengths.
const MEGABATCH: usize = 50;

/// What one micro-batch is made of, before its tokens are copied.
enum MicroPlan {
    /// Whole examples (`pad`, `flatten`).
    Examples(Vec<u32>),
    /// A `concat` stream segment: `(example, start, end)`.
    Pieces(Vec<(u32, usize, usize)>),
    /// `offline` rows of examples.
    Rows(Vec<Vec<u32>>),
}

/// Plans and builds steps.
pub(crate) struct Planner {
    examples: Arc<Vec<Example>>,
    pack: PackOptions,
    grad_accum: usize,
    seed: u64,
    shuffle: bool,
    order_epoch: Option<u64>,
    order: Vec<u32>,
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
                        pieces.push((i, start, end));
                        room -= end - start;
                        if end == len(i) {
                            next.cursor += 1;
                            next.offset = 0;
                        } else {
                            next.offset = end as u64;
                        }
                    }
                    plans.push(MicroPlan::Pieces(pieces));
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

    /// Builds the step at `pos`.
    pub(crate) fn next_step(&mut self, pos: &DataPosition) -> Step {
        let (plans, position_after) = self.plan(pos);
        let ex = |i: &u32| &self.examples[*i as usize];
        let batches = plans
            .iter()
            .map(|p| match p {
                MicroPlan::Examples(ids) => {
                    let refs: Vec<&Example> = ids.iter().map(ex).collect();
                    pack_micro_batch(&refs, &self.pack)
                }
                MicroPlan::Pieces(pieces) => {
                    let pieces: Vec<Piece> = pieces
                        .iter()
                        .map(|&(i, start, end)| Piece {
                            example: ex(&i),
                            start,
                            end,
                        })
                        .collect();
                    pack_concat(&cut_rows(&pieces, self.pack.max_len))
                }
                MicroPlan::Rows(rows) => {
                    let rows: Vec<Vec<&Example>> =
                        rows.iter().map(|r| r.iter().map(ex).collect()).collect();
                    pack_rows(&rows)
                }
            })
            .collect();
        Step {
            batches,
            epoch: pos.epoch,
            position_after,
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
