//! ZeRO sharding over the ranks of a data-parallel run (`--shard 1|2|3`), and the exchange of
//! each group's gradient from the backward's hook (every stage).
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
//! - Stage 3 ([`ShardStage::Params`]): the parameters too. The model holds only this rank's
//!   pieces ([`Model::new_sharded`], cut by [`weight_pieces`] as the state is), laid out as the
//!   stage-2 accumulator is, and gathers each group's weights from the ranks just ahead of their
//!   use ([`ShardSource`], the model's [`WeightSource`]); gradients go as in stage 2; the update
//!   writes the rank's pieces in place and nothing is all-gathered after it (the next forward
//!   gathers them). LoRA is refused: its base is frozen, so there is nothing of it to update
//!   piece by piece, and its adapters are too small to be worth sharding.
//!
//! Checkpoints stay those of one rank: [`Optimizer::gather_state`] collects the pieces onto
//! rank 0's host before a save (in stage 3 the weights too), and a restore writes each rank's
//! pieces out of the whole state.

use std::ops::Range;

use nopad_backend::codes::QUANT_BLOCK;
use nopad_backend::{AdamWState, Backend, Kind, MasterPrecision, StatePrecision};
use nopad_model::{
    Config, GroupGrads, GroupKind, Layout, Model, ParamGroup, Phase, Placed, WeightSource,
};

use super::{Optimizer, UpdateInfo};
use crate::collective::{aligned_shard, Aligned, Collective};
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
    /// 3: parameters sharded too, each group's gathered just ahead of its use.
    Params,
}

impl ShardStage {
    /// The stage's number, as `--shard` takes it.
    pub fn number(self) -> u8 {
        match self {
            ShardStage::Replicated => 0,
            ShardStage::States => 1,
            ShardStage::Grads => 2,
            ShardStage::Params => 3,
        }
    }

    /// Every stage, lowest first.
    pub const ALL: [ShardStage; 4] = [
        ShardStage::Replicated,
        ShardStage::States,
        ShardStage::Grads,
        ShardStage::Params,
    ];

    /// Whether the model keeps one group's gradient at a time (stages 2 and 3).
    pub fn one_group_grads(self) -> bool {
        self >= ShardStage::Grads
    }
}

/// The stage `--shard` names (0, 1, 2 or 3).
pub fn parse_shard(s: &str) -> Result<ShardStage> {
    ShardStage::ALL
        .into_iter()
        .find(|st| st.number().to_string() == s)
        .ok_or_else(|| {
            TrainError::Config(format!(
                "`shard`: {s} is not 0 (replicated), 1 (optimizer states sharded), 2 \
                 (gradients sharded too) or 3 (weights sharded too)"
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
    /// Where the part's gradient lies in the stage-2 accumulator (and, in stage 3, the part's
    /// parameters in the model's buffer of pieces, laid out alike).
    acc: usize,
}

/// Pieces start on multiples of this: a block of 256 with 8-bit moments, else anywhere.
fn piece_align(states: StatePrecision) -> usize {
    match states {
        StatePrecision::Block8 => QUANT_BLOCK,
        _ => 1,
    }
}

/// Rank `rank` of `world`'s pieces of every range of `groups` (the weight-decay part of the
/// buffer ends at `split`), in group order, each starting on a multiple of `align` of its part.
fn cut(
    groups: &[ParamGroup],
    (split, stage): (usize, ShardStage),
    (rank, world): (usize, usize),
    align: usize,
) -> Result<Vec<Piece>> {
    let (mut pieces, mut acc) = (vec![], 0);
    for (group, g) in groups.iter().enumerate() {
        for (range, decay) in g.ranges() {
            let part_start = if decay { 0 } else { split };
            if !(range.start - part_start).is_multiple_of(align) {
                return Err(TrainError::Config(format!(
                    "--optim-states 8bit with --shard {}: parameter group `{}` has a range {range:?} that does not start on a block of {align} parameters (the model's hidden size is not a multiple of {align}); use --optim-states bf16 or --shard 0",
                    stage.number(),
                    g.kind
                )));
            }
            let rel = aligned_shard(rank, world, range.len(), align);
            let own = range.start + rel.start..range.start + rel.end;
            acc += own.len();
            pieces.push(Piece {
                group,
                range,
                decay,
                acc: acc - own.len(),
                own,
            });
        }
    }
    Ok(pieces)
}

/// This rank's piece of every parameter range of a model of `cfg` in stage 3, cut as the
/// optimizer's state is for moments in `states`: what [`Model::new_sharded`] takes.
pub fn weight_pieces<B: Backend>(
    cfg: &Config,
    coll: &dyn Collective<B>,
    states: StatePrecision,
) -> Result<Vec<nopad_model::Piece>> {
    let layout = Layout::new(cfg);
    let at = (layout.decay_end, ShardStage::Params);
    let ranks = (coll.rank(), coll.world_size());
    let pieces = cut(&layout.groups, at, ranks, piece_align(states))?;
    Ok(pieces
        .into_iter()
        .map(|p| nopad_model::Piece {
            range: p.range,
            own: p.own,
        })
        .collect())
}

/// Where piece `p`'s parameters lie in the model's trainable buffer: at their own offsets,
/// or in stage 3 in the buffer of pieces, where the accumulator keeps their gradient.
fn params_of(stage: ShardStage, p: &Piece) -> Range<usize> {
    match stage {
        ShardStage::Params => p.acc..p.acc + p.own.len(),
        _ => p.own.clone(),
    }
}

/// That `model` holds its weights as `stage` shards them: only `pieces` in stage 3 (built by
/// [`weight_pieces`] for the same moments), whole below.
fn check_model<B: Backend>(model: &Model<B>, stage: ShardStage, pieces: &[Piece]) -> Result<()> {
    let refuse = |why: &str| Err(TrainError::Config(why.into()));
    match (stage, model.is_sharded()) {
        (ShardStage::Params, _) if model.lora().is_some() => refuse(
            "--shard 3 shards the weights of full fine-tuning; a LoRA run's base is frozen and its adapters are small: use --shard 0, 1 or 2",
        ),
        (ShardStage::Params, false) => refuse(
            "--shard 3 needs a model that holds only this rank's pieces (Model::new_sharded with weight_pieces)",
        ),
        (ShardStage::Params, true) => {
            let want = pieces.iter().map(|p| (p.range.clone(), p.own.clone()));
            let held = model.pieces().into_iter().map(|p| (p.range, p.own));
            match want.eq(held) {
                true => Ok(()),
                false => refuse("the model's pieces are not the ones this rank's optimizer state covers (cut them with weight_pieces for the same --optim-states and ranks)"),
            }
        }
        (_, true) => refuse("a model sharded by weight (Model::new_sharded) takes --shard 3"),
        (_, false) => Ok(()),
    }
}

/// A stage-3 model's [`WeightSource`]: each group's ranges all-gathered over the ranks, each
/// rank's piece where [`weight_pieces`] cut it.
pub struct ShardSource<'a, B: Backend> {
    coll: &'a dyn Collective<B>,
    align: usize,
}

impl<'a, B: Backend> ShardSource<'a, B> {
    /// The source over `coll` of a model cut for moments in `states`.
    pub fn new(coll: &'a dyn Collective<B>, states: StatePrecision) -> Self {
        ShardSource {
            coll,
            align: piece_align(states),
        }
    }
}

impl<B: Backend> WeightSource<B> for ShardSource<'_, B> {
    fn ranks(&self) -> usize {
        self.coll.world_size()
    }

    fn materialise(
        &mut self,
        b: &B,
        (kind, phase): (GroupKind, Phase),
        (buf, placed): (&mut B::Buf, &Placed),
    ) -> nopad_model::Result<()> {
        for (r, at) in placed {
            let op = (Aligned::AllGather, self.align);
            let range = *at..at + r.len();
            self.coll.exchange_aligned(b, op, buf, range).map_err(|e| {
                nopad_model::ModelError::Input(format!(
                    "gathering the weights of `{kind}` for the {}: {e}",
                    match phase {
                        Phase::Forward => "forward",
                        Phase::Backward => "backward",
                    }
                ))
            })?;
        }
        Ok(())
    }
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
    /// [`Optimizer`]'s parts), master copies and accumulator. In stage 3 `model` must hold
    /// these pieces ([`weight_pieces`]).
    #[allow(clippy::type_complexity)]
    pub(crate) fn new(
        b: &B,
        opt: &Optimizer<B>,
        model: &Model<B>,
        coll: &dyn Collective<B>,
        (stage, split): (ShardStage, usize),
    ) -> Result<(Self, Vec<(usize, AdamWState<B>)>)> {
        let cfg = &opt.cfg;
        let align = piece_align(cfg.states);
        let groups: Vec<ParamGroup> = opt.groups.iter().map(|(g, _)| g.clone()).collect();
        let ranks = (coll.rank(), coll.world_size());
        let pieces = cut(&groups, (split, stage), ranks, align)?;
        check_model(model, stage, &pieces)?;
        let params = model.trainable();
        let total = pieces.iter().map(|p| p.range.end).max().unwrap_or(0);
        let acc_len: usize = pieces.iter().map(|p| p.own.len()).sum();
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
                .map(|p| {
                    let at = params_of(stage, p);
                    Ok((p.own.start, piece_master_new(b, params, at)?))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![]
        };
        let acc = match stage {
            ShardStage::Grads | ShardStage::Params => {
                Some(b.alloc(acc_len, Kind::Grad).map_err(|e| {
                    e.while_allocating(|| format!("the gradient shard of {acc_len} parameters"))
                })?)
            }
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

    /// The [`WeightSource`] of a stage-3 model over `coll` (its pieces cut for this
    /// optimizer's moments).
    pub fn weight_source<'a>(&self, coll: &'a dyn Collective<B>) -> ShardSource<'a, B> {
        ShardSource::new(coll, self.cfg.states)
    }

    /// Exchanges one group's gradient, as [`Model::backward_with`] (or
    /// [`Model::groups_without_backward`]) hands it over, with the other ranks: all-reduced in
    /// stage 0, reduce-scattered in stage 1; in stages 2 and 3 reduce-scattered and this rank's
    /// piece added into the accumulator ([`Optimizer::begin_accumulation`]). Stages 0 and 1
    /// call it in a step's last micro-batch, stages 2 and 3 in every one. A frozen group is not
    /// exchanged.
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
        // Stages 0 and 1 keep every group's gradient until the update, so the exchange is
        // deferred: it runs while the backward computes the next groups, and the step settles
        // before the update reads it. Stages 2 and 3 add this rank's piece into the accumulator
        // at once (the next group's gradient overwrites the scratch), so theirs is in order.
        let Some(sh) = self.shards.as_mut() else {
            for (r, _) in ranges {
                let at = g.grad_range(&r);
                coll.all_reduce_deferred(b, b.view_mut(g.grads, at), r.len())?;
            }
            return Ok(());
        };
        let op = match sh.acc {
            None => Aligned::ReduceScatterDeferred,
            Some(_) => Aligned::ReduceScatter,
        };
        for p in sh.pieces.iter().filter(|p| p.group == g.index) {
            let at = g.grad_range(&p.range);
            coll.exchange_aligned(b, (op, sh.align), g.grads, at.clone())?;
            if let Some(acc) = sh.acc.as_mut() {
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

    /// Starts a stage-2 or stage-3 step: the gradient accumulator to zero (a no-op in other
    /// stages).
    pub fn begin_accumulation(&mut self, b: &B) -> Result<()> {
        if let Some(acc) = self.shards.as_mut().and_then(|s| s.acc.as_mut()) {
            let n = b.buf_len(acc);
            b.zero(b.view_mut(acc, 0..n))?;
        }
        Ok(())
    }

    /// The update of a sharded optimizer (stages 1 to 3; see [`Optimizer::update`]): the norm
    /// of the pieces' gradients over the ranks, clipping, each piece's AdamW, then (below stage
    /// 3) every trainable range all-gathered.
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
        let stage = sh.stage;
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
            let to = (&mut *params, params_of(stage, p).start);
            self.adamw(b, to, grads, p.own.clone(), at(p), p.decay, lr, clip)?;
        }
        // Stage 3 gathers the weights where they are used, in the next forward.
        for p in live.iter().filter(|_| stage != ShardStage::Params) {
            coll.exchange_aligned(b, (Aligned::AllGather, align), params, p.range.clone())?;
        }
        Ok(UpdateInfo::applied(norm))
    }

    /// Elements of optimizer state this rank holds: both moments, the master copy and the
    /// gradient accumulator of stages 2 and 3 (what sharding divides by the number of ranks).
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
        let e = parse_shard("4").unwrap_err().to_string();
        assert!(e.contains("3 (weights sharded too)"), "{e}");
    }
}
