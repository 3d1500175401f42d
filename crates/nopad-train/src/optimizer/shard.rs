//! ZeRO sharding of the optimizer over the ranks of a data-parallel run (`--shard 1|2`), and
//! the exchange of each group's gradient from the backward's hook (every stage).
//!
//! Each trainable range of each group is cut into one contiguous piece per rank
//! ([`Collective::shard_aligned`]; with 8-bit moments every piece starts on a block of 256 of
//! the unsharded state, so the quantisation blocks, hence the numbers, are those of one rank).
//! A rank keeps AdamW's moments and the master copy of its pieces only: one state part per
//! piece, which the update finds the way it finds the two parts of an unsharded state.
//!
//! - Stage 0 ([`ShardStage::Replicated`]): each group's gradient is all-reduced from the hook
//!   of the step's last micro-batch; every rank holds the whole state and runs the same update.
//! - Stage 1 ([`ShardStage::States`]): the hook reduce-scatters instead; the norm is the sum
//!   of the pieces' squares over the ranks; each rank updates its pieces and the updated
//!   parameters are all-gathered range by range.
//! - Stage 2 ([`ShardStage::Grads`]): the model keeps one group's gradient at a time; every
//!   micro-batch's hook reduce-scatters it and adds the rank's piece into a persistent
//!   accumulator of the pieces (1/N of the gradients), which the update reads.
//!
//! Checkpoints stay those of one rank: [`Optimizer::gather_state`] collects the pieces onto
//! rank 0's host before a save, and a restore writes each rank's pieces out of the whole state.

use std::ops::Range;

use nopad_backend::codes::QUANT_BLOCK;
use nopad_backend::{AdamWState, Backend, Kind, MasterPrecision, StatePrecision};
use nopad_model::{GroupGrads, Model};

use super::{Optimizer, UpdateInfo};
use crate::collective::{Aligned, Collective};
use crate::error::{Result, TrainError};

mod io;
use io::{piece_master_new, Gathered};

/// How the ranks of a data-parallel run divide the optimizer's memory (`--shard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShardStage {
    /// 0: every rank holds everything; gradients are all-reduced.
    #[default]
    Replicated,
    /// 1: moments and master weights sharded; gradients reduce-scattered, weights all-gathered.
    States,
    /// 2: gradients sharded too (one group's full gradient at a time).
    Grads,
}

impl ShardStage {
    /// The stage's number, as `--shard` takes it.
    pub fn number(self) -> u8 {
        match self {
            ShardStage::Replicated => 0,
            ShardStage::States => 1,
            ShardStage::Grads => 2,
        }
    }

    /// Every stage, lowest first.
    pub const ALL: [ShardStage; 3] = [
        ShardStage::Replicated,
        ShardStage::States,
        ShardStage::Grads,
    ];
}

/// The stage `--shard` names (0, 1 or 2).
pub fn parse_shard(s: &str) -> Result<ShardStage> {
    ShardStage::ALL
        .into_iter()
        .find(|st| st.number().to_string() == s)
        .ok_or_else(|| {
            TrainError::Config(format!(
                "`shard`: {s} is not 0 (replicated), 1 (optimizer states sharded) or 2 \
                 (gradients sharded too); stage 3 (weights sharded) is not implemented"
            ))
        })
}

/// This rank's part of one trainable range of one group.
#[derive(Clone, Debug)]
pub(crate) struct Piece {
    /// The group's index.
    group: usize,
    /// The whole range, as every rank sees it.
    range: Range<usize>,
    /// Whether it takes weight decay.
    decay: bool,
    /// This rank's part of it (absolute, possibly empty).
    own: Range<usize>,
    /// Where the part's gradient lies in the stage-2 accumulator.
    acc: usize,
}

/// A rank's share of a sharded optimizer (stages 1 and 2).
pub(crate) struct Shards<B: Backend> {
    stage: ShardStage,
    /// Pieces start on multiples of this (256 with 8-bit moments, else 1).
    align: usize,
    rank: usize,
    world: usize,
    /// One per trainable range of every group, in group order.
    pieces: Vec<Piece>,
    /// The weight-decay boundary and the length of the whole state, to answer as one rank.
    split: usize,
    total: usize,
    /// The master copy of each non-empty piece (offset, buffer), when one is kept.
    masters: Vec<(usize, B::Buf)>,
    /// Stage 2: `[Σ piece]` Grad, the pieces' gradients summed over ranks and micro-batches.
    acc: Option<B::Buf>,
    /// Rank 0's copy of the whole state, between [`Optimizer::gather_state`] and the save.
    gathered: Option<Gathered>,
}

impl<B: Backend> Shards<B> {
    /// Rank `coll.rank()`'s pieces of `opt`'s groups, with their moments (returned, for
    /// [`Optimizer`]'s parts), master copies and accumulator.
    #[allow(clippy::type_complexity)]
    pub(crate) fn new(
        b: &B,
        opt: &Optimizer<B>,
        params: &B::Buf,
        coll: &dyn Collective<B>,
        (stage, split): (ShardStage, usize),
    ) -> Result<(Self, Vec<(usize, AdamWState<B>)>)> {
        let cfg = &opt.cfg;
        let align = match cfg.states {
            StatePrecision::Block8 => QUANT_BLOCK,
            _ => 1,
        };
        let (mut pieces, mut acc_len, mut total) = (vec![], 0, 0);
        for (group, (g, _)) in opt.groups.iter().enumerate() {
            for (range, decay) in g.ranges() {
                let part_start = if decay { 0 } else { split };
                if !(range.start - part_start).is_multiple_of(align) {
                    return Err(TrainError::Config(format!(
                        "--optim-states 8bit with --shard {}: parameter group `{}` has a range {range:?} that does not start on a block of {align} parameters (the model's hidden size is not a multiple of {align}); use --optim-states bf16 or --shard 0",
                        stage.number(),
                        g.kind
                    )));
                }
                let rel = coll.shard_aligned(range.len(), align);
                let own = range.start + rel.start..range.start + rel.end;
                total = total.max(range.end);
                pieces.push(Piece {
                    group,
                    range,
                    decay,
                    own: own.clone(),
                    acc: acc_len,
                });
                acc_len += own.len();
            }
        }
        let mine = || pieces.iter().filter(|p| !p.own.is_empty());
        let states = mine()
            .map(|p| {
                let s = AdamWState::new(b, p.own.len(), cfg.states).map_err(|e| {
                    e.while_allocating(|| {
                        format!("AdamW's moments of a shard of {} parameters", p.own.len())
                    })
                })?;
                Ok((p.own.start, s))
            })
            .collect::<Result<Vec<_>>>()?;
        let masters = if b.needs_master() && cfg.master == MasterPrecision::F32 {
            mine()
                .map(|p| Ok((p.own.start, piece_master_new(b, params, p.own.clone())?)))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        let acc = match stage {
            ShardStage::Grads => Some(b.alloc(acc_len, Kind::Grad).map_err(|e| {
                e.while_allocating(|| format!("the gradient shard of {acc_len} parameters"))
            })?),
            _ => None,
        };
        let shards = Shards {
            stage,
            align,
            rank: coll.rank(),
            world: coll.world_size(),
            pieces,
            split,
            total,
            masters,
            acc,
            gathered: None,
        };
        Ok((shards, states))
    }

    /// The master copy holding `range` and the range relative to it.
    pub(crate) fn master_view<'a>(
        &'a mut self,
        b: &'a B,
        range: &Range<usize>,
    ) -> Option<B::Mut<'a>> {
        let (off, m) = self
            .masters
            .iter_mut()
            .find(|(off, m)| *off <= range.start && range.end <= *off + b.buf_len(m))?;
        Some(b.view_mut(m, range.start - *off..range.end - *off))
    }

    /// The lengths of the whole state's parts (as one rank's).
    pub(crate) fn state_lens(&self) -> Vec<usize> {
        [self.split, self.total - self.split]
            .into_iter()
            .filter(|&n| n > 0)
            .collect()
    }

    /// Where part `part` of the whole state starts (the weight-decay part first; with no
    /// decayed parameters the one part starts at `split`, which is 0).
    fn part_start(&self, part: usize) -> usize {
        if part == 0 {
            0
        } else {
            self.split
        }
    }
}

impl<B: Backend> Optimizer<B> {
    /// The sharding stage (stage 0 also for an optimizer of one process).
    pub fn shard_stage(&self) -> ShardStage {
        self.shards
            .as_ref()
            .map_or(ShardStage::Replicated, |s| s.stage)
    }

    /// Exchanges one group's gradient, as [`Model::backward_with`] (or
    /// [`Model::groups_without_backward`]) hands it over, with the other ranks: all-reduced in
    /// stage 0, reduce-scattered in stage 1; in stage 2 reduce-scattered and this rank's piece
    /// added into the accumulator ([`Optimizer::begin_accumulation`]). Stages 0 and 1 call it in
    /// a step's last micro-batch, stage 2 in every one. A frozen group is not exchanged.
    pub fn exchange_group(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        g: GroupGrads<'_, B>,
    ) -> Result<()> {
        let (group, s) = self.group_at(g.index)?;
        if !s.trainable {
            return Ok(());
        }
        let ranges: Vec<_> = group.ranges().collect();
        let Some(sh) = self.shards.as_mut() else {
            for (r, _) in ranges {
                let at = g.grad_range(&r);
                coll.all_reduce(b, b.view_mut(g.grads, at), r.len())?;
            }
            return Ok(());
        };
        for p in sh.pieces.iter().filter(|p| p.group == g.index) {
            let at = g.grad_range(&p.range);
            coll.exchange_aligned(b, (Aligned::ReduceScatter, sh.align), g.grads, at.clone())?;
            if let (ShardStage::Grads, Some(acc)) = (sh.stage, sh.acc.as_mut()) {
                let n = p.own.len();
                let src = at.start + (p.own.start - p.range.start);
                b.add_assign(
                    b.view_mut(acc, p.acc..p.acc + n),
                    b.view(g.grads, src..src + n),
                    n,
                )?;
            }
        }
        Ok(())
    }

    /// Starts a stage-2 step: the gradient accumulator to zero (a no-op in other stages).
    pub fn begin_accumulation(&mut self, b: &B) -> Result<()> {
        if let Some(acc) = self.shards.as_mut().and_then(|s| s.acc.as_mut()) {
            let n = b.buf_len(acc);
            b.zero(b.view_mut(acc, 0..n))?;
        }
        Ok(())
    }

    /// The update of a sharded optimizer (stages 1 and 2; see [`Optimizer::update`]): the norm
    /// of the pieces' gradients over the ranks, clipping, each piece's AdamW, then every
    /// trainable range all-gathered.
    pub(crate) fn update_sharded(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        (model, lr): (&mut Model<B>, f64),
    ) -> Result<UpdateInfo> {
        let Some(sh) = self.shards.as_mut() else {
            return Err(TrainError::Config("update_sharded without shards".into()));
        };
        // Taken out for the update, so that `adamw` may borrow the optimizer.
        match sh.acc.take() {
            Some(acc) => {
                let r = self.update_pieces(b, coll, model.trainable_mut(), (&acc, true), lr);
                if let Some(sh) = self.shards.as_mut() {
                    sh.acc = Some(acc);
                }
                r
            }
            None => {
                let (params, grads) = model.params_and_grads(b)?;
                self.update_pieces(b, coll, params, (grads, false), lr)
            }
        }
    }

    /// [`Optimizer::update_sharded`] with the gradients in `grads`: at the pieces' own offsets,
    /// or at their accumulator offsets when `in_acc`.
    fn update_pieces(
        &mut self,
        b: &B,
        coll: &dyn Collective<B>,
        params: &mut B::Buf,
        (grads, in_acc): (&B::Buf, bool),
        lr: f64,
    ) -> Result<UpdateInfo> {
        let Some(sh) = self.shards.as_ref() else {
            return Err(TrainError::Config("update_pieces without shards".into()));
        };
        let align = sh.align;
        let live: Vec<Piece> = sh
            .pieces
            .iter()
            .filter(|p| self.groups[p.group].1.trainable)
            .cloned()
            .collect();
        let at = |p: &Piece| match in_acc {
            true => p.acc..p.acc + p.own.len(),
            false => p.own.clone(),
        };
        let mut sq = [0.0f64];
        for p in live.iter().filter(|p| !p.own.is_empty()) {
            sq[0] += b.sum_squares(b.view(grads, at(p)), p.own.len())?;
        }
        coll.all_reduce_host(&mut sq)?;
        let norm = sq[0].sqrt();
        let Some(clip) = self.start_update(norm) else {
            return Ok(UpdateInfo::skipped(norm));
        };
        for p in live.iter().filter(|p| !p.own.is_empty()) {
            self.adamw(b, params, grads, p.own.clone(), at(p), p.decay, lr, clip)?;
        }
        for p in &live {
            coll.exchange_aligned(b, (Aligned::AllGather, align), params, p.range.clone())?;
        }
        Ok(UpdateInfo::applied(norm))
    }

    /// Elements of optimizer state this rank holds: both moments, the master copy and the
    /// stage-2 gradient accumulator (what sharding divides by the number of ranks).
    pub fn state_elements(&self, b: &B) -> usize {
        let moments: usize = self.states.iter().map(|(_, s)| 2 * s.len()).sum();
        let master = match (&self.master, &self.shards) {
            (Some(m), _) => b.buf_len(m),
            (None, Some(sh)) => sh.masters.iter().map(|(_, m)| b.buf_len(m)).sum(),
            (None, None) => 0,
        };
        let acc = self
            .shards
            .as_ref()
            .and_then(|s| s.acc.as_ref())
            .map_or(0, |a| b.buf_len(a));
        moments + master + acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_parse_by_number() {
        for st in ShardStage::ALL {
            assert_eq!(parse_shard(&st.number().to_string()).unwrap(), st);
        }
        let e = parse_shard("3").unwrap_err().to_string();
        assert!(
            e.contains("stage 3 (weights sharded) is not implemented"),
            "{e}"
        );
    }
}
