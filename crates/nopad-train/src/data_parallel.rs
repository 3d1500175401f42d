//! The data-parallel step: each rank runs its share of a step's micro-batches and the ranks
//! exchange each parameter group's gradient from the backward's hook
//! ([`nopad_model::Model::backward_with`]: a group is the bucket), so on a GPU the exchange of
//! one group overlaps the backward of the groups below it. What is exchanged and when depends
//! on the sharding stage ([`ShardStage`], module `optimizer::shard`):
//!
//! - stages 0 and 1: in the backward of the rank's last non-empty micro-batch, when each
//!   group's gradient is the rank's whole sum (all-reduce or reduce-scatter);
//! - stages 2 and 3: in every micro-batch's backward, from the model's one-group gradient
//!   scratch into the optimizer's accumulator of this rank's pieces; in stage 3 the forward and
//!   the backward also gather each group's weights from the ranks ([`crate::ShardSource`]).
//!
//! Collectives are meeting points, so a rank with nothing to run (an empty micro-batch, or an
//! empty share) hands its groups over without a backward
//! ([`nopad_model::Model::groups_without_backward`]) and makes the same calls. In stage 3 the
//! gathers of a forward and a backward are meetings too, so such a rank runs one token without
//! a target instead ([`NO_TOKENS`]): its gradient is exactly zero, its calls are its peers'.
//! The loss, the norm and the update then follow as in one process ([`crate::step::finish`]).

use nopad_backend::Backend;
use nopad_data::Batch;
use nopad_model::{Inputs, Model, WeightSource};

use crate::collective::Collective;
use crate::error::{Result, TrainError};
use crate::optimizer::{Optimizer, ShardStage};
use crate::step::{finish, inputs, StepOutcome};

/// Whether a step of `opt` over `coll` takes the data-parallel path (several ranks, or a
/// sharded optimizer even on one).
pub(crate) fn is_data_parallel<B: Backend>(coll: &dyn Collective<B>, opt: &Optimizer<B>) -> bool {
    coll.world_size() > 1 || opt.shard_stage() != ShardStage::Replicated
}

/// One step of this rank over its share `batches`, the loss scaled by `scale` (1 / the target
/// tokens of the whole step over every rank, which is `targets`).
pub(crate) fn data_parallel_step<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    (model, opt): (&mut Model<B>, &mut Optimizer<B>),
    batches: &[Batch],
    (targets, scale): (usize, f32),
    lr: f64,
) -> Result<StepOutcome> {
    let stage = opt.shard_stage();
    if model.updates_in_backward() && !stage.one_group_grads() {
        return Err(TrainError::Config(format!(
            "the optimizer in the backward runs on one rank (this run has {} ranks, --shard {}): turn --optim-in-backward off",
            coll.world_size(),
            stage.number()
        )));
    }
    opt.begin_accumulation(b)?;
    let mut src = opt.weight_source(coll);
    let mut exchange = |g: nopad_model::GroupGrads<'_, B>| opt.exchange_group(b, coll, g);
    if stage == ShardStage::Params {
        let src: &mut dyn WeightSource<B> = &mut src;
        exchange_every_micro_batch(b, (model, Some(src)), batches, scale, &mut exchange)?;
    } else if stage == ShardStage::Grads {
        exchange_every_micro_batch(b, (model, None), batches, scale, &mut exchange)?;
    } else {
        let last = batches.iter().rposition(|x| !x.is_empty());
        for (i, batch) in batches.iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            model.forward_train(b, &inputs(batch), scale)?;
            if Some(i) == last {
                model.backward_with(b, &mut exchange)?;
            } else {
                model.backward(b)?;
            }
        }
        if last.is_none() {
            model.groups_without_backward(b, &mut exchange)?;
        }
    }
    // The deferred gradient exchanges (stages 0 and 1) are complete before the update reads
    // them.
    coll.settle(b)?;
    let out = finish(b, coll, model, opt, targets, lr)?;
    model.zero_grads(b)?;
    Ok(out)
}

/// What a stage-3 rank with an empty micro-batch runs: one token without a target, whose loss
/// and gradients are zero, so that it meets its peers at every gather of their passes.
pub(crate) const NO_TOKENS: Inputs<'static> = Inputs {
    tokens: &[0],
    targets: &[-100],
    position_ids: &[0],
    cu_seqlens: &[0, 1],
    max_seqlen: 1,
};

/// The micro-batches of stages 2 and 3 (`src`: the stage-3 model's weight source): each one's
/// gradient handed to `exchange` group by group, then dropped (the next micro-batch overwrites
/// it; the sum lives in the optimizer's accumulator).
fn exchange_every_micro_batch<B: Backend>(
    b: &B,
    (model, mut src): (&mut Model<B>, Option<&mut dyn WeightSource<B>>),
    batches: &[Batch],
    scale: f32,
    exchange: &mut impl FnMut(nopad_model::GroupGrads<'_, B>) -> Result<()>,
) -> Result<()> {
    for batch in batches {
        match src.as_deref_mut() {
            Some(src) => {
                let x = if batch.is_empty() {
                    NO_TOKENS
                } else {
                    inputs(batch)
                };
                model.forward_train_from(b, &x, scale, &mut *src)?;
                model.backward_from(b, src, &mut *exchange)?;
            }
            None if batch.is_empty() => model.groups_without_backward(b, &mut *exchange)?,
            None => {
                model.forward_train(b, &inputs(batch), scale)?;
                model.backward_with(b, &mut *exchange)?;
            }
        }
        model.zero_grads(b)?;
    }
    Ok(())
}
