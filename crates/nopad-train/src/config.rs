//! What a training run is asked to do: [`TrainConfig`] and the sources of its model and data.
//! Validated values only; parsing flags and config files is the CLI's job.

use std::path::PathBuf;
use std::time::Duration;

use nopad_data::{synthetic, Format, LongPolicy, LossOn, Strategy};
use nopad_model::weights::SaveDtype;

use crate::optimizer::AdamWConfig;
use crate::schedule::Decay;
use crate::signals::Interrupt;

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A built-in preset, randomly initialised from the seed.
    Preset(String),
    /// An HF model directory (config.json + safetensors).
    Dir(PathBuf),
}

/// Where the training examples come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// A user's file.
    File(PathBuf),
    /// The built-in synthetic instruction set.
    Synthetic {
        /// Length distribution.
        dist: synthetic::LengthDist,
        /// Number of examples.
        examples: usize,
    },
}

/// Which checkpoint a run continues from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint under `out`; a fresh start (with a note) when there is none,
    /// so one command line serves the first start and every restart after a preemption.
    Latest,
    /// This checkpoint directory; an error when it is not a complete checkpoint.
    Dir(PathBuf),
}

/// Every setting of a training run, validated.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Model.
    pub model: ModelSource,
    /// Training data.
    pub data: DataSource,
    /// Force a data format instead of detecting it.
    pub format: Option<Format>,
    /// What to do with examples longer than `max_len`.
    pub long: LongPolicy,
    /// Skip (and count) bad records instead of failing.
    pub skip_bad: bool,
    /// Refuse examples with no target token instead of skipping (and counting) them.
    pub strict: bool,
    /// Which tokens are targets; `None`: the data format's default.
    pub loss_on: Option<LossOn>,
    /// A Jinja chat template replacing the tokenizer's (`--chat-template`).
    pub chat_template: Option<PathBuf>,
    /// Folder of the tokenised-data cache (`--dataset-cache`; None: tokenise every run).
    pub dataset_cache: Option<PathBuf>,
    /// Columns renamed before conversion, `(new, old)` (`--columns`).
    pub columns: Vec<(String, String)>,
    /// Packing strategy.
    pub strategy: Strategy,
    /// Examples per micro-batch (rows for concat/offline).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Longest example (or row) in tokens.
    pub max_len: usize,
    /// Length-grouped sampling for `pad`.
    pub group_by_length: bool,
    /// Optimizer steps to run (wins over `epochs`).
    pub steps: Option<u64>,
    /// Epochs to run when `steps` is not given.
    pub epochs: Option<f64>,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up updates.
    pub warmup: u64,
    /// Warm-up as a fraction of the run (wins over `warmup`): see [`warmup_steps`].
    pub warmup_ratio: Option<f64>,
    /// Decay after warm-up.
    pub decay: Decay,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Output directory: the final weights in HF layout at its root, checkpoints in
    /// `checkpoint-NNNNNN/` below it.
    pub out: Option<PathBuf>,
    /// Element type of the final weights (checkpoints are always f32, so resuming is exact).
    pub save_dtype: SaveDtype,
    /// JSON-lines log of every logged step and evaluation.
    pub log: Option<PathBuf>,
    /// Folder of TensorBoard event files with the logged scalars (`--report-to tensorboard`).
    pub tensorboard: Option<PathBuf>,
    /// Log every this many steps.
    pub log_every: u64,
    /// Held-out data, evaluated at the end (and every `eval_every` steps).
    pub eval_data: Option<PathBuf>,
    /// Evaluate `eval_data` every this many steps as well as at the end.
    pub eval_every: Option<u64>,
    /// Save a checkpoint under `out` every this many steps.
    pub save_every: Option<u64>,
    /// Keep only the newest this many checkpoints (older ones are deleted after a save).
    pub keep: Option<usize>,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Stop (saving a checkpoint) after this step, keeping the schedule of the whole run, as a
    /// preempted run would; `resume` continues it.
    pub stop_after: Option<u64>,
    /// Stop with an error after this many consecutive steps whose loss or gradient norm was not
    /// finite (their updates are skipped); 0 never stops.
    pub max_bad_steps: u64,
    /// Activation recomputation in the backward (less memory, more compute); results are
    /// unchanged.
    pub recompute: nopad_model::Recompute,
    /// With one micro-batch per step (`grad_accum` 1), place the parameter gradients over dead
    /// activations (`Model::set_grad_aliasing`); results are unchanged.
    pub grad_aliasing: bool,
    /// Update each parameter group inside the backward as soon as its gradient is complete,
    /// keeping one group's gradient at a time (`Model::set_update_in_backward`): steps of one
    /// micro-batch, no clipping (see `step.rs`).
    pub optim_in_backward: bool,
    /// Train LoRA adapters on a frozen base instead of every weight (None: full fine-tuning).
    pub lora: Option<crate::LoraTrain>,
    /// Where the optimizer's weights and moments live (`--offload optimizer`:
    /// [`crate::Placement::Host`], updated on the host's cores). Results are unchanged, and a
    /// checkpoint resumes with or without it.
    pub offload: crate::Placement,
    /// Layers whose gate/up projections live in host memory between their forward and backward
    /// (`--offload activations:K`, `Model::set_offload_activations`; 0: none). Results are
    /// unchanged.
    pub offload_activations: usize,
    /// Ranks of a data-parallel run on the CPU (`--ranks N`: threads of this process over
    /// [`crate::ThreadGroup`], [`crate::train_threads`]); 1 otherwise. A run over another
    /// collective ([`crate::train_rank`]) takes its world size from the collective.
    pub ranks: usize,
    /// ZeRO stage (`--shard`); None: the lowest stage the memory plan says fits.
    pub shard: Option<crate::ShardStage>,
    /// Draw a progress bar (only on a terminal).
    pub progress: bool,
    /// Bytes of device memory the memory plan must fit (`--gpu-memory`; default: the device's
    /// own total, none on the CPU).
    pub gpu_memory: Option<usize>,
    /// Set by a signal handler (see [`crate::signals`]): the run finishes its step, saves a
    /// checkpoint and stops.
    pub interrupt: Option<Interrupt>,
    /// Greedy samples from the current weights every so many steps (`--sample-every`); None:
    /// no samples.
    pub sample: Option<crate::SampleConfig>,
    /// Test-only: the gradients of this step are poisoned with NaN (its loss scale is NaN), as
    /// a numerically broken batch would; the update must be skipped and counted.
    pub nan_at_step: Option<u64>,
    /// Test-only: sleep this long between the files of a checkpoint save, so a test can kill the
    /// process in the middle of one.
    pub save_delay: Option<Duration>,
}

/// The steps of a run: `steps` if given, else `epochs` × `steps_per_epoch` rounded up (at least
/// one), else one epoch.
pub fn total_steps(steps: Option<u64>, epochs: Option<f64>, steps_per_epoch: usize) -> u64 {
    match (steps, epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * steps_per_epoch as f64).ceil().max(1.0) as u64,
        (None, None) => steps_per_epoch as u64,
    }
}

/// The warm-up of a run of `total` steps: `ceil(ratio × total)` when a ratio is given, else
/// `warmup`; never beyond the run.
pub fn warmup_steps(warmup: u64, ratio: Option<f64>, total: u64) -> u64 {
    ratio
        .map_or(warmup, |r| (r * total as f64).ceil() as u64)
        .min(total)
}

impl TrainConfig {
    /// The built-in default: the small preset on synthetic FLAN-like data with `flatten`,
    /// sized to finish in under two minutes on two CPU cores.
    pub fn default_cpu() -> Self {
        TrainConfig {
            model: ModelSource::Preset("small".into()),
            data: DataSource::Synthetic {
                dist: synthetic::LengthDist::FlanLike,
                examples: 4096,
            },
            format: None,
            long: LongPolicy::Truncate,
            skip_bad: false,
            strict: false,
            loss_on: None,
            chat_template: None,
            dataset_cache: None,
            columns: Vec::new(),
            strategy: Strategy::Flatten,
            batch_size: 16,
            grad_accum: 1,
            max_len: 512,
            group_by_length: false,
            steps: Some(150),
            epochs: None,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 10,
            warmup_ratio: None,
            decay: Decay::Cosine,
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            seed: 0,
            out: None,
            save_dtype: SaveDtype::F32,
            log: None,
            tensorboard: None,
            log_every: 1,
            eval_data: None,
            eval_every: None,
            save_every: None,
            keep: None,
            resume: None,
            stop_after: None,
            max_bad_steps: 10,
            recompute: nopad_model::Recompute::None,
            grad_aliasing: true,
            optim_in_backward: false,
            lora: None,
            offload: crate::Placement::Device,
            offload_activations: 0,
            ranks: 1,
            shard: None,
            progress: true,
            gpu_memory: None,
            interrupt: None,
            nan_at_step: None,
            save_delay: None,
            sample: None,
        }
    }

    /// Checks the settings that do not need the model or the data.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::TrainError::Config;
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_len < 2 {
            return Err(Config(
                "batch-size and grad-accum must be ≥ 1, max-len ≥ 2".into(),
            ));
        }
        let zero = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(Config(format!("`{key}`: must be at least 1"))),
            _ => Ok(()),
        };
        zero("save-every", self.save_every)?;
        zero("eval-every", self.eval_every)?;
        zero("stop-after", self.stop_after)?;
        zero("keep", self.keep.map(|k| k as u64))?;
        if self.out.is_none() {
            for (key, set) in [
                ("save-every", self.save_every.is_some()),
                ("stop-after", self.stop_after.is_some()),
                ("keep", self.keep.is_some()),
                ("resume latest", self.resume == Some(Resume::Latest)),
            ] {
                if set {
                    return Err(Config(format!(
                        "`{key}` needs `out`: checkpoints are written to (and found in) OUT/checkpoint-NNNNNN"
                    )));
                }
            }
        }
        if self.optim_in_backward && self.grad_accum != 1 {
            return Err(Config(format!(
                "`optim-in-backward` updates each group as its gradient completes, so a step is one micro-batch: it cannot accumulate {} (use grad-accum 1 and a larger batch-size)",
                self.grad_accum
            )));
        }
        if let (true, Some(max)) = (self.optim_in_backward, self.adamw.max_grad_norm) {
            return Err(Config(format!(
                "`optim-in-backward` cannot clip the gradient norm (max-grad-norm {max}): clipping needs the global norm before the first group's update; set max-grad-norm 0, or leave it unset (with optim-in-backward it then defaults to off)"
            )));
        }
        if let (true, Some(_)) = (self.optim_in_backward, &self.lora) {
            return Err(Config(
                "`optim-in-backward` is for full fine-tuning: a LoRA run's gradients are the adapters' and small, so it updates after the backward".into(),
            ));
        }
        if self.ranks == 0 {
            return Err(Config("`ranks` must be at least 1".into()));
        }
        if self.ranks > 1 && self.optim_in_backward {
            return Err(Config(format!(
                "`optim-in-backward` runs on one rank: it cannot update in the backward of {} ranks (--shard 2 keeps one group's gradient at a time instead)",
                self.ranks
            )));
        }
        if let (true, Some(st)) = (self.offload == crate::Placement::Host, self.shard) {
            if st != crate::ShardStage::Replicated {
                return Err(Config(format!(
                    "`offload optimizer` keeps the whole optimizer state on the host of every rank; it takes `shard` 0, not {}",
                    st.number()
                )));
            }
        }
        if let Some(lt) = &self.lora {
            lt.settings
                .validate("LoRA flags")
                .map_err(|e| Config(e.to_string()))?;
        }
        if let Some(sc) = &self.sample {
            sc.validate()?;
        }
        if self.eval_every.is_some() && self.eval_data.is_none() {
            return Err(Config(
                "`eval-every` needs `eval-data` (the held-out file to evaluate)".into(),
            ));
        }
        Ok(())
    }
}
