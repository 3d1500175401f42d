//! One optimizer step, written once for the trainer, the evaluation and the benchmark: the
//! loader's micro-batches, each forward and backward with the loss scaled by
//! 1 / (target tokens of the whole step), then one AdamW update.
//!
//! Loss normalisation is the reason for this shape: the number of target tokens of a step is
//! known on the host before any forward (the packer counted them; [`Collective`] sums it over
//! the ranks), so every micro-batch's gradient is scaled by the same `1/targets_of_step` and the
//! accumulated gradient is exactly that of one big batch, for any strategy and any split into
//! micro-batches.

use nopad_backend::Backend;
use nopad_data::Batch;
use nopad_model::{Inputs, Model, Resident, WeightSource};

use crate::collective::Collective;
use crate::error::{Result, TrainError};
use crate::optimizer::{Optimizer, UpdateInfo};

/// The model's view of a packed batch.
pub fn inputs(batch: &Batch) -> Inputs<'_> {
    Inputs {
        tokens: &batch.tokens,
        targets: &batch.targets,
        position_ids: &batch.position_ids,
        cu_seqlens: &batch.cu_seqlens,
        max_seqlen: batch.max_seqlen,
    }
}

/// What one training step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Token-weighted mean loss of the step (over every rank).
    pub loss: f64,
    /// Global gradient norm before clipping (NaN when the loss was not finite).
    pub grad_norm: f64,
    /// Whether the update was applied (false: a non-finite loss or norm, nothing changed).
    pub applied: bool,
}

/// Target tokens of a step's micro-batches on every rank; an error when there are none.
pub fn step_targets<B: Backend>(coll: &dyn Collective<B>, batches: &[Batch]) -> Result<usize> {
    let local: usize = batches.iter().map(|x| x.stats.target_tokens).sum();
    let targets = coll.all_reduce_count(local)?;
    if targets == 0 {
        return Err(TrainError::Config(
            "a step has no target tokens (every label is -100)".into(),
        ));
    }
    Ok(targets)
}

/// Forward and backward over each non-empty micro-batch, the loss scaled by `scale`; the
/// gradients add up in the model.
pub fn accumulate<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    batches: &[Batch],
    scale: f32,
) -> Result<()> {
    for batch in batches {
        if batch.is_empty() {
            continue;
        }
        model.forward_train(b, &inputs(batch), scale)?;
        model.backward(b)?;
    }
    Ok(())
}

/// The end of a step after [`accumulate`]: takes the loss (`targets` from [`step_targets`]) and
/// applies the update where the loss is finite. Gradients are left for the caller to zero.
pub fn finish<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    targets: usize,
    lr: f64,
) -> Result<StepOutcome> {
    let mut sum = [model.take_loss_sum(b)?];
    coll.all_reduce_host(&mut sum)?;
    let loss = sum[0] / targets as f64;
    // A non-finite loss or gradient norm leaves weights and moments untouched (`update` checks
    // the norm); the caller zeroes the gradients either way, so nothing non-finite survives.
    let info = if loss.is_finite() {
        opt.update(b, coll, model, lr)?
    } else {
        UpdateInfo::skipped(f64::NAN)
    };
    Ok(StepOutcome {
        loss,
        grad_norm: info.grad_norm,
        applied: info.applied,
    })
}

/// Runs forward and backward over a step's micro-batches and applies one update.
pub fn train_step<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    lr: f64,
) -> Result<StepOutcome> {
    step_scaled(b, coll, model, opt, batches, lr, false)
}

/// [`train_step`], with the loss scale replaced by NaN when `poison` (a test of the skip path).
pub(crate) fn step_scaled<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    lr: f64,
    poison: bool,
) -> Result<StepOutcome> {
    let targets = step_targets(coll, batches)?;
    let scale = if poison {
        f32::NAN
    } else {
        1.0 / targets as f32
    };
    if crate::data_parallel::is_data_parallel(coll, opt) {
        let at = (targets, scale);
        return crate::data_parallel::data_parallel_step(b, coll, (model, opt), batches, at, lr);
    }
    if model.updates_in_backward() {
        return step_in_backward(b, coll, model, opt, batches, targets, scale, lr);
    }
    accumulate(b, model, batches, scale)?;
    let out = finish(b, coll, model, opt, targets, lr)?;
    model.zero_grads(b)?;
    Ok(out)
}

/// Evaluation forward of one batch; returns its target tokens (the loss sum stays in the model,
/// [`Model::take_loss_sum`]). A batch without targets is skipped.
pub fn eval_step<B: Backend>(b: &B, model: &mut Model<B>, batch: &Batch) -> Result<usize> {
    eval_step_from(b, model, batch, &mut Resident)
}

/// [`eval_step`] with the weights brought by `src` (a model sharded by weight).
pub fn eval_step_from<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    batch: &Batch,
    src: &mut dyn WeightSource<B>,
) -> Result<usize> {
    let targets = batch.stats.target_tokens;
    if targets > 0 {
        model.forward_eval_from(b, &inputs(batch), src)?;
    }
    Ok(targets)
}

/// A step whose update runs inside the backward (`--optim-in-backward`,
/// [`Model::set_update_in_backward`]): each parameter group is updated as soon as its gradient
/// is complete, and the next group's gradient is written over it.
///
/// Two things differ from [`finish`], both because no group waits for the others:
/// - **No clipping.** Clipping by the global norm needs every gradient before the first update,
///   which is exactly what this mode gives up; the configuration refuses `max_grad_norm` with it
///   ([`crate::TrainConfig::validate`]). The global norm is still computed, group by group, and
///   reported.
/// - **Non-finite gradients are caught per group.** A non-finite loss (known after the forward)
///   skips the whole step as [`finish`] does. Otherwise each group's squared norm is read before
///   its update, and a group with a non-finite gradient is left untouched (weights and moments);
///   the step is then reported as not applied although the groups before it were updated.
#[allow(clippy::too_many_arguments)]
fn step_in_backward<B: Backend>(
    b: &B,
    coll: &dyn Collective<B>,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    targets: usize,
    scale: f32,
    lr: f64,
) -> Result<StepOutcome> {
    let live: Vec<&Batch> = batches.iter().filter(|x| !x.is_empty()).collect();
    if live.len() != 1 || coll.world_size() != 1 {
        return Err(TrainError::Config(format!(
            "the optimizer in the backward takes steps of one micro-batch on one rank (this step has {} micro-batches on {} ranks): use --grad-accum 1 and one GPU, or turn --optim-in-backward off",
            live.len(),
            coll.world_size()
        )));
    }
    model.forward_train(b, &inputs(live[0]), scale)?;
    let loss = model.take_loss_sum(b)? / targets as f64;
    if !loss.is_finite() {
        model.zero_grads(b)?;
        return Ok(StepOutcome {
            loss,
            grad_norm: f64::NAN,
            applied: false,
        });
    }
    opt.begin_step();
    let (mut sq, mut all_finite) = (0.0f64, true);
    model.backward_with(b, |g| {
        let s = opt.group_grad_squares(b, &g)?;
        sq += s;
        if !s.is_finite() {
            all_finite = false;
            return Ok(());
        }
        opt.update_group(b, g, lr, 1.0)
    })?;
    // An offloaded optimizer's last host update, and the device's wait for the new weights.
    opt.finish_group_updates(b, &mut model.params)?;
    model.zero_grads(b)?;
    Ok(StepOutcome {
        loss,
        grad_norm: sq.sqrt(),
        applied: all_finite,
    })
}
