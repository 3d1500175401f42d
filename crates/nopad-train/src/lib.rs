//! nopad-train: the training loop over a [`nopad_model::Model`] on any backend: token-weighted
//! loss across gradient accumulation, AdamW over parameter groups with clipping, learning-rate
//! schedules, evaluation, per-step metrics, the run summary, and checkpoints a run resumes from
//! exactly.
//!
//! Brief overview: [`train`] runs a [`TrainConfig`] and returns a [`Summary`]. It opens a session
//! (`session`: resume, model, data, identity, loader, schedule), then loops over
//! [`train_step`] (`step`, shared with [`evaluate`] and `nopad bench`), logging, evaluation and
//! checkpoints (`trainer`). [`Optimizer`] updates the model's parameter groups, one at a time if
//! asked ([`Optimizer::update_group`]); [`Collective`] is what ranks exchange ([`SingleProcess`]
//! for one). Other modules: `config`, `schedule`, `records` (step and eval records, the run's
//! history, [`Summary`]), `identity` (what must match to resume), `signals` (SIGINT/SIGTERM → a
//! graceful stop), `runlog` (the JSON-lines log), `plan` (the memory plan: predicted peak by kind, what fits),
//! `samples` (prompts for generation, and a run's samples every `--sample-every` steps), `error`.
//!
//! Every module is private and the API is the `pub use` block below, except [`checkpoint`]: the
//! checkpoint directory format, whose free functions (`latest`, `load_state`, …) read best
//! under their module's name.

#![deny(missing_docs)]

pub mod checkpoint;
mod collective;
mod config;
mod data_parallel;
mod dist;
mod error;
mod eval;
mod identity;
mod lora;
mod offload;
mod optimizer;
mod out_lock;
mod plan;
mod ranks;
mod records;
mod runlog;
mod samples;
mod schedule;
mod session;
mod settings;
mod signals;
mod state_check;
mod step;
mod tensorboard;
mod trainer;

pub use collective::{aligned_shard, Aligned, Collective, SingleProcess, ThreadGroup, ThreadRank};
pub use config::{warmup_steps, DataSource, ModelSource, Resume, TrainConfig};
pub use dist::{
    launch_local, rendezvous, without_flag, DistError, DistOptions, LaunchOptions, Meeting,
    NcclCollective, RendezvousOptions, WorkerExit, World, NCCL_TIMEOUT_VAR, RENDEZVOUS_TIMEOUT_VAR,
    STOPPED_STATUS, WORLD_VARS,
};
pub use error::{Result, TrainError};
pub use eval::{evaluate, evaluate_from, EvalResult};
pub use identity::{config_hash, RunIdentity};
pub use lora::{build_adapter_eval_model, build_lora_model, LoraTrain};
pub use optimizer::{
    master_name, parse_master, parse_offload, parse_shard, parse_states, states_name,
    weight_pieces, AdamWConfig, GroupSettings, MasterPrecision, Offload, Optimizer, Placement,
    ShardSource, ShardStage, StatePrecision, UpdateInfo,
};
pub use out_lock::{OutLock, LOCK_FILE};
pub use plan::{
    check_device, check_fits, check_run, gib, is_out_of_memory, largest_fitting,
    largest_micro_batch, last_plan, mode_grid, modes_of, parse_gib, plan, plan_rank,
    print_plan_for_out_of_memory, sampling_bytes, stage_grid, table, DeviceSizes, Modes, Plan,
    Trained, CUDA_BLAS_WORKSPACE, CUDA_CONTEXT_BYTES, CUDA_SLACK_DIVISOR, PLANNED_STAGES,
};
pub use ranks::train_threads;
pub use records::{Counters, EvalRecord, RankImbalance, StepRecord, StopReason, Summary};
pub use samples::{
    completion_text, model_tokenizer, read_prompts, Prompt, PromptInput, Sample, SampleConfig,
};
pub use schedule::{Decay, Schedule};
pub use session::{
    build_eval_model, build_model, build_model_layers, load_data, model_config, pad_token_id,
};
pub use signals::{install as install_signal_handlers, Interrupt};
pub use step::{accumulate, eval_step, finish, inputs, step_targets, train_step, StepOutcome};
pub use trainer::{train, train_rank};
