//! The data-parallel step: each rank runs its share of a step's micro-batches and the ranks
//! exchange each parameter group's gradient from the backward's hook
//! ([`nopad_model::Model::backward_with`]: a group is the bucket), so on a GPU the exchange of
//! one group overlaps the backward of the groups below it. What is exchanged and when depends
//! on the sharding stage ([`ShardStage`], module `optimizer::shard`):
//!
//! - stages 0 and 1: in the backward of the rank's last non-empty micro-batch, when each
//!   group's gradient is the rank's whole sum (all-reduce or reduce-scatter);
//! - stage 2: in every micro-batch's backward, from the model's one-group gradient scratch
//!   into the optimizer's accumulator of this rank's pieces.
//!
//! Collectives are meeting points, so a rank with nothing to run (an empty micro-batch, or an
//! empty share) hands its groups over without a backward
//! ([`nopad_model::Model::groups_without_backward`]) and makes the same calls. The loss, the
//! norm and the update then follow as in one process ([`crate::step::finish`]).

use nopad_backend::Backend;
use nopad_data::Batch;
use nopad_model::Model;

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
    if model.updates_in_backward() && stage != ShardStage::Grads {
        return Err(TrainError::Config(format!(
            "the optimizer in the backward runs on one rank (this run has {} ranks, --shard {}): turn --optim-in-backward off",
            coll.world_size(),
            stage.number()
        )));
    }
    opt.begin_accumulation(b)?;
    let mut exchange = |g: nopad_model::GroupGrads<'_, B>| opt.exchange_group(b, coll, g);
    if stage == ShardStage::Grads {
        exchange_every_micro_batch(b, model, batches, scale, &mut exchange)?;
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
    let out = finish(b, coll, model, opt, targets, lr)?;
    model.zero_grads(b)?;
    Ok(out)
}

/// Stage 2's micro-batches: each one's gradient handed to `exchange` group by group, then
/// dropped (the next micro-batch overwrites it; the sum lives in the optimizer's accumulator).
fn exchange_every_micro_batch<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    batches: &[Batch],
    scale: f32,
    exchange: &mut impl FnMut(nopad_model::GroupGrads<'_, B>) -> Result<()>,
) -> Result<()> {
    for batch in batches {
        if batch.is_empty() {
            model.groups_without_backward(b, &mut *exchange)?;
        } else {
            model.forward_train(b, &inputs(batch), scale)?;
            model.backward_with(b, &mut *exchange)?;
        }
        model.zero_grads(b)?;
    }
    Ok(())
}
