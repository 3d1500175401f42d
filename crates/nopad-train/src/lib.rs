//! nopad-train: the training loop over a [`nopad_model::Model`] on any backend: token-weighted
//! loss across gradient accumulation, AdamW with clipping, learning-rate schedules, evaluation,
//! per-step metrics, the run summary, and checkpoints a run resumes from exactly.
//!
//! Module map: `trainer` (the loop, [`train`]), `config` ([`TrainConfig`]), `optimizer`,
//! `schedule`, `eval`, `records` (step and eval records, [`Summary`]), `checkpoint` (layout,
//! atomic saves, `latest`, restore), `identity` (what must match to resume), `signals`
//! (SIGINT/SIGTERM → a graceful stop), `runlog` (the JSON-lines log).

#![deny(missing_docs)]

pub mod checkpoint;
mod collective;
mod config;
mod error;
pub mod eval;
pub mod identity;
pub mod optimizer;
mod records;
mod runlog;
pub mod schedule;
pub mod signals;
mod step;
pub mod trainer;

pub use collective::{Collective, SingleProcess};
pub use config::{DataSource, ModelSource, Resume, TrainConfig};
pub use error::{Result, TrainError};
pub use eval::{evaluate, EvalResult};
pub use optimizer::{AdamWConfig, GroupSettings, Optimizer, Placement, StatePrecision, UpdateInfo};
pub use records::{EvalRecord, StepRecord, StopReason, Summary};
pub use schedule::{Decay, Schedule};
pub use signals::Interrupt;
pub use step::{accumulate, eval_step, finish, inputs, step_targets, train_step, StepOutcome};
pub use trainer::{build_eval_model, build_model, load_data, model_config, pad_token_id, train};
