//! Evaluation: the token-weighted loss of a model over every example of a data set, once each,
//! in order. The result does not depend on the strategy or the batch size (up to float
//! rounding), because every target token counts once with the same weight.

use nopad_backend::Backend;
use nopad_data::{eval_batches, Example, PackOptions};
use nopad_model::{Model, Resident, WeightSource};
use serde::Serialize;

use crate::error::Result;
use crate::step::eval_step_from;

/// Result of an evaluation.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all target tokens.
    pub loss: f64,
    /// Number of target tokens.
    pub tokens: usize,
}

/// Evaluates `model` over `examples`, packed as `pack` says.
pub fn evaluate<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    examples: &[Example],
    pack: &PackOptions,
) -> Result<EvalResult> {
    evaluate_from(b, model, examples, pack, &mut Resident)
}

/// [`evaluate`] with the weights brought by `src`: a model sharded by weight (`--shard 3`) is
/// evaluated by every rank at once, each gathering the weights with the others.
pub fn evaluate_from<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    examples: &[Example],
    pack: &PackOptions,
    src: &mut dyn WeightSource<B>,
) -> Result<EvalResult> {
    let mut tokens = 0;
    model.take_loss_sum(b)?;
    for batch in eval_batches(examples, pack) {
        tokens += eval_step_from(b, model, &batch, &mut *src)?;
    }
    let sum = model.take_loss_sum(b)?;
    Ok(EvalResult {
        loss: if tokens > 0 {
            sum / tokens as f64
        } else {
            f64::NAN
        },
        tokens,
    })
}
