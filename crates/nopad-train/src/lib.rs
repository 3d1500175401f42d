//! nopad-train: the training loop over a [`nopad_model::Model`] on any backend: token-weighted
//! loss across gradient accumulation, AdamW with clipping, learning-rate schedules, evaluation,
//! per-step metrics and the run summary.

#![deny(missing_docs)]

mod error;
pub mod eval;
pub mod optimizer;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
pub use eval::{evaluate, EvalResult};
pub use optimizer::{AdamWConfig, Optimizer};
pub use schedule::{Decay, Schedule};
pub use trainer::{train, DataSource, ModelSource, StepRecord, Summary, TrainConfig};
