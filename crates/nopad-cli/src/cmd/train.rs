//! `nopad train`: flags and TOML config files (the same keys), merged into a validated
//! [`TrainConfig`]. Precedence: flag > config file > built-in default. An unknown key or a bad
//! value is an error naming the key (and the file).
//!
//! Exit status: 0 when the run finished (or stopped at `--stop-after`), 2 on an error, 75 when
//! SIGINT/SIGTERM stopped it after saving a checkpoint, 128 + signal when a second signal ended it
//! at once or when the first one came while the data was being prepared (nothing to save yet).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use nopad_data::synthetic::LengthDist;
use nopad_model::weights::SaveDtype;
use nopad_train::{DataSource, ModelSource, Resume, StopReason, TrainConfig};
use serde::Deserialize;

use crate::device::{parse_grad_dtype, DeviceChoice, Precision};

/// Flags of `nopad train`. Every flag but `--config` may also be a key of the config file.
#[derive(Args, Clone, Debug, Default, Deserialize)]
#[command(after_help = "Checkpoints and stopping:
  With --out, SIGINT or SIGTERM (Ctrl-C) finishes the current step, saves OUT/checkpoint-NNNNNN
  and exits with status 75; a second signal exits at once (status 130 or 143), leaving the newest
  complete checkpoint intact. A signal while the data is being prepared (read, tokenised,
  templated) stops at once with status 130 or 143: nothing was trained or written yet.
  Continue with the same flags plus `--resume latest`: the next batch, learning rate and loss
  are those of an uninterrupted run (bit-identical on the CPU).
  Exit status: 0 done (or --stop-after reached), 2 error, 75 stopped by a signal after saving.")]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainArgs {
    /// TOML file with any of these settings as keys (e.g. `batch-size = 8`); flags win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model: an HF directory (config.json + safetensors) or a preset (tiny, small,
    /// llama-3.2-1b, llama-3.1-8b, llama-2-7b, mistral-7b, qwen2.5-0.5b, qwen3-0.6b; random init).
    /// Default: small.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: a JSONL/JSON file, or `synthetic-flan` (default) / `synthetic-orcamath`.
    #[arg(long)]
    pub data: Option<String>,
    /// Examples generated for synthetic data. Default 4096.
    #[arg(long)]
    pub synthetic_examples: Option<usize>,
    /// Data format (default: detected): pretokenized, text, prompt-completion, messages, sharegpt, alpaca.
    #[arg(long)]
    pub format: Option<String>,
    /// Examples longer than --max-len: truncate (default), split or drop.
    #[arg(long)]
    pub long: Option<String>,
    /// Skip (and count) malformed records instead of stopping.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad: Option<bool>,
    /// Stop at an example with no target token instead of skipping and counting it.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub strict: Option<bool>,
    /// Targets: assistant (chat turns; default for conversations), completion (default for
    /// prompt/completion) or all (every token; default for text).
    #[arg(long, value_name = "WHICH")]
    pub loss_on: Option<String>,
    /// A Jinja chat template that replaces the model's (tokenizer_config.json's
    /// chat_template), as HF's `tokenizer.chat_template = ...` does.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Keep the tokenised examples in this folder, keyed by the data, tokenizer, template and
    /// every loading option, so reruns and resumes skip tokenisation. Default: off.
    #[arg(long, value_name = "DIR")]
    pub dataset_cache: Option<PathBuf>,
    /// Rename a Parquet or Arrow table's columns to the fields a format reads, e.g.
    /// prompt=question,completion=answer.
    #[arg(long, value_name = "NEW=OLD,...")]
    pub columns: Option<String>,
    /// Packing: pad, concat, flatten (default) or offline.
    #[arg(long)]
    pub strategy: Option<String>,
    /// Examples per micro-batch (rows of max-len for concat and offline). Default 16.
    #[arg(long, visible_alias = "per-device-train-batch-size")]
    #[serde(alias = "per-device-train-batch-size")]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step. Default 1.
    #[arg(long, visible_alias = "gradient-accumulation-steps")]
    #[serde(alias = "gradient-accumulation-steps")]
    pub grad_accum: Option<usize>,
    /// Longest example in tokens. Default: with an HF model directory, the model's
    /// max_position_embeddings up to 4096; else 512.
    #[arg(long, visible_aliases = ["max-seq-length", "max-length"])]
    #[serde(alias = "max-seq-length", alias = "max-length")]
    pub max_len: Option<usize>,
    /// Length-grouped sampling (pad).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub group_by_length: Option<bool>,
    /// Optimizer steps (wins over --epochs). Default: 150 for the built-in run, else one epoch.
    #[arg(long, visible_alias = "max-steps")]
    #[serde(alias = "max-steps")]
    pub steps: Option<u64>,
    /// Epochs (may be fractional). Default 1 with --data or --model and no --steps.
    #[arg(long, visible_alias = "num-train-epochs")]
    #[serde(alias = "num-train-epochs")]
    pub epochs: Option<f64>,
    /// Peak learning rate. Default: 2e-5 with an HF model directory (fine-tuning); 3e-3 for
    /// presets and the built-in run (training from random init).
    #[arg(long, visible_alias = "learning-rate")]
    #[serde(alias = "learning-rate")]
    pub lr: Option<f64>,
    /// Final learning rate. Default 0.1 × lr.
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Warm-up updates. Default 10.
    #[arg(long, visible_alias = "warmup-steps", conflicts_with = "warmup_ratio")]
    #[serde(alias = "warmup-steps")]
    pub warmup: Option<u64>,
    /// Warm-up as a fraction of the run: ceil(R × total steps), resolved once the run's length
    /// is known. Excludes --warmup.
    #[arg(long, value_name = "R")]
    pub warmup_ratio: Option<f64>,
    /// Decay after warm-up: cosine (default), linear or constant.
    #[arg(long, visible_alias = "lr-scheduler-type")]
    #[serde(alias = "lr-scheduler-type")]
    pub schedule: Option<String>,
    /// Decoupled weight decay on matrices. Default 0.01.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Clip the global gradient norm (0 = off). Default 1.0 (off under --optim-in-backward).
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// AdamW's two moments: f32 (8 bytes per parameter, the default), bf16 (4) or 8bit
    /// (block-wise 8-bit codes with one f32 scale per 256 values, about 2.03). A checkpoint
    /// resumes only in the precision it was written with.
    #[arg(long, value_name = "f32|bf16|8bit")]
    pub optim_states: Option<String>,
    /// f32 (the default): an fp32 master copy of the weights where the device computes in bf16
    /// (2 more bytes per parameter on CUDA, which keeps only the low halves). none: no master
    /// copy; each update is rounded stochastically to bf16 (on the CPU too, whose weights stay
    /// f32 buffers holding bf16 values), drawing its bits from --seed.
    #[arg(long, value_name = "f32|none")]
    pub master_weights: Option<String>,
    /// Update each layer's weights inside the backward as soon as its gradient is complete, so
    /// only one layer's gradient (plus the embedding's) is ever alive: 2 or 4 bytes per
    /// parameter less. Steps of one micro-batch (grad-accum 1), and no gradient clipping
    /// (max-grad-norm then defaults to 0; a positive one is refused), because clipping needs
    /// the global norm before the first update.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub optim_in_backward: Option<bool>,
    /// What lives in host memory, comma-separated. `optimizer`: the fp32 weights and both
    /// moments, updated on the host's cores (ZeRO-Offload style), for models whose optimizer
    /// state does not fit on the device; gradients go down and new weights come back over PCIe,
    /// overlapped with the backward under --optim-in-backward. `activations:K`: the gate/up
    /// projections (two thirds of a layer's saved activations) of K layers spread over the
    /// stack, copied to the host while the next layers compute and back during the backward,
    /// instead of recomputing them (--recompute mlp:K). Results and checkpoints are the same as
    /// without.
    #[arg(long, value_name = "optimizer,activations:K")]
    pub offload: Option<String>,
    /// Data-parallel ranks as threads of this process on the CPU (--device cpu): each rank has
    /// its own model, its share of the optimizer state and grad-accum micro-batches of every
    /// step, which is the one-rank step of ranks x grad-accum micro-batches. Default 1.
    #[arg(long)]
    pub ranks: Option<usize>,
    /// ZeRO stage of a data-parallel run: 0 every rank holds everything (gradients
    /// all-reduced), 1 the optimizer's moments and master weights are sharded, 2 the gradients
    /// too, 3 the weights too (gathered layer by layer). Default: the lowest the memory plan
    /// says fits.
    #[arg(long, value_name = "0|1|2|3")]
    pub shard: Option<String>,
    /// Train on N GPUs of this host: starts N worker processes of this command (one per GPU,
    /// torchrun's variables set), data parallel over NCCL. Under torchrun or srun (RANK,
    /// WORLD_SIZE, ... set) leave it out: each process is already a worker. docs/DISTRIBUTED.md.
    #[arg(long, value_name = "N")]
    #[serde(skip)]
    pub gpus: Option<usize>,
    /// Also write TensorBoard event files (`tensorboard`) into DIR/runs, DIR being --out (or the
    /// --log file's folder): loss, learning rate, gradient norm, throughput, evaluation loss.
    #[arg(long, value_name = "tensorboard")]
    pub report_to: Option<String>,
    /// Seed of initialisation and data order. Default 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory: the final weights in HF layout at its root (written when the run reaches
    /// its last step), checkpoints in OUT/checkpoint-NNNNNN/.
    #[arg(long, visible_alias = "output-dir")]
    #[serde(alias = "output-dir")]
    pub out: Option<PathBuf>,
    /// Save a checkpoint every N steps under --out (weights in HF layout, optimizer moments, data
    /// position, schedule and counters; written atomically).
    #[arg(long, value_name = "N", visible_alias = "save-steps")]
    #[serde(alias = "save-steps")]
    pub save_every: Option<u64>,
    /// Keep only the newest K checkpoints (older ones are deleted after each save). Default: all.
    #[arg(long, value_name = "K", visible_alias = "save-total-limit")]
    #[serde(alias = "save-total-limit")]
    pub keep: Option<usize>,
    /// Continue from a checkpoint directory, or `latest`: the newest complete one under --out (a
    /// fresh start when there is none yet). Give the run's other flags unchanged: a checkpoint
    /// whose model, data, strategy or schedule differ is refused, naming each difference.
    #[arg(long, value_name = "DIR|latest")]
    pub resume: Option<String>,
    /// Stop after step N (saving a checkpoint), keeping the schedule of the whole run; continue
    /// later with --resume latest. Exit status 0.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// Stop with an error after N consecutive steps whose loss or gradient norm was not finite
    /// (their updates are skipped, counted and logged); 0 never stops. Default 10.
    #[arg(long, value_name = "N")]
    pub max_bad_steps: Option<u64>,
    /// Element type of the final weights: f32 (default) or bf16 (checkpoints are always f32).
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Write one JSON line per logged step (and per evaluation) here; a resumed run appends.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Log every N steps (the JSON lines, and a plain line on stderr when it is not a terminal).
    /// Default 1.
    #[arg(long, visible_alias = "logging-steps")]
    #[serde(alias = "logging-steps")]
    pub log_every: Option<u64>,
    /// Held-out data evaluated at the end of training (token-weighted loss, every example once).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Also evaluate --eval-data every N steps (logged as {"step", "eval_loss", "eval_tokens"}).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// auto (the default: CUDA if present, else CPU), cpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// Compute type on CUDA: bf16 (the default; mixed precision, fp32 master weights) or f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Parameter gradients on CUDA in bf16 mode: auto (default: bf16 when a step is one
    /// micro-batch, so each gradient is rounded once, as it is written; f32 under gradient
    /// accumulation, where bf16 would round at every micro-batch), f32 or bf16.
    #[arg(long)]
    pub grad_dtype: Option<String>,
    /// Activation recomputation in the backward: none (default), mlp (drop the gate/up projections, two
    /// thirds of a layer's saved activations, and redo that GEMM: ~8% more compute) or full (keep
    /// only each layer's input: one layer's activations instead of all, ~a third more compute).
    /// A bare --recompute means full.
    #[arg(long, num_args = 0..=1, default_missing_value = "full")]
    pub recompute: Option<nopad_model::Recompute>,
    /// Keep the parameter gradients in a buffer of their own. By default a run with one
    /// micro-batch per step places them over activations that are dead by the time each is
    /// written (same results, less memory).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_grad_aliasing: Option<bool>,
    /// Never draw a progress bar.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_progress: Option<bool>,
    /// Device memory in GiB the memory plan must fit (default: the device's total; the CPU
    /// has none, so no check unless given). The plan is printed before step 1.
    #[arg(long, value_name = "GIB")]
    pub gpu_memory: Option<f64>,
    #[command(flatten)]
    #[serde(skip)]
    pub lora: super::lora::LoraArgs,
    #[command(flatten)]
    #[serde(skip)]
    pub sample: super::generate::SampleArgs,
    /// Test only: poison step N's gradients with NaN.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_nan_at_step: Option<u64>,
    /// Test only: sleep this many milliseconds between the files of a checkpoint save.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub test_save_delay_ms: Option<u64>,
}

/// Peak learning rate of a run from an HF model directory (full fine-tuning's usual value).
pub const FINE_TUNE_LR: f64 = 2e-5;
/// Longest default example of a run from an HF model directory (if the model allows it).
pub const FINE_TUNE_MAX_LEN: usize = 4096;

fn parse<T: std::str::FromStr<Err = String>>(key: &str, v: &str) -> Result<T> {
    v.parse::<T>().map_err(|e| anyhow::anyhow!("`{key}`: {e}"))
}

fn read_file(path: &Path) -> Result<TrainArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))
}

impl TrainArgs {
    /// Fills every field this one leaves empty from `file`.
    fn or(self, file: TrainArgs) -> TrainArgs {
        macro_rules! pick {
            ($($f:ident),*) => { TrainArgs {
                config: self.config,
                gpus: self.gpus,
                lora: self.lora,
                sample: self.sample,
                test_nan_at_step: self.test_nan_at_step,
                test_save_delay_ms: self.test_save_delay_ms,
                $($f: self.$f.or(file.$f)),*
            } };
        }
        pick!(
            model,
            data,
            synthetic_examples,
            format,
            long,
            skip_bad,
            strict,
            loss_on,
            chat_template,
            dataset_cache,
            columns,
            strategy,
            batch_size,
            grad_accum,
            max_len,
            group_by_length,
            steps,
            epochs,
            lr,
            min_lr,
            warmup,
            warmup_ratio,
            schedule,
            weight_decay,
            max_grad_norm,
            optim_states,
            master_weights,
            optim_in_backward,
            offload,
            ranks,
            shard,
            seed,
            out,
            save_every,
            keep,
            resume,
            stop_after,
            max_bad_steps,
            save_dtype,
            log,
            log_every,
            eval_data,
            eval_every,
            device,
            dtype,
            grad_dtype,
            recompute,
            no_grad_aliasing,
            no_progress,
            gpu_memory,
            report_to
        )
    }

    /// Merges the config file (if any) and validates everything into a [`TrainConfig`].
    pub fn resolve(&self) -> Result<(TrainConfig, DeviceChoice, Precision)> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => TrainArgs::default(),
        };
        let a = self.clone().or(file);
        let mut c = TrainConfig::default_cpu();
        if let Some(m) = &a.model {
            c.model = super::model_source(m)?;
        }
        // Fine-tuning a pretrained model wants a small step and the model's own context; the
        // demo's values (random init, short examples) stay for presets.
        if let ModelSource::Dir(dir) = &c.model {
            c.lr = FINE_TUNE_LR;
            c.min_lr = FINE_TUNE_LR * 0.1;
            // An unreadable config.json is reported (with its path) when the run opens the model.
            if let Ok(cfg) = nopad_model::weights::read_config(dir) {
                c.max_len = cfg.max_position_embeddings.clamp(8, FINE_TUNE_MAX_LEN);
            }
        }
        let n_synth = a.synthetic_examples.unwrap_or(4096);
        c.data = match a.data.as_deref() {
            None | Some("synthetic-flan") => DataSource::Synthetic {
                dist: LengthDist::FlanLike,
                examples: n_synth,
            },
            Some("synthetic-orcamath") => DataSource::Synthetic {
                dist: LengthDist::OrcaMathLike,
                examples: n_synth,
            },
            Some(p) => {
                // A file, or a `save_to_disk` directory (`DIR` or `DIR:SPLIT`) of Arrow files.
                let files = nopad_data::data_files(Path::new(p))
                    .map_err(|e| anyhow::anyhow!("`data`: {e}"))?;
                if !files.iter().all(|f| f.is_file()) {
                    bail!("`data`: {p} is not a file or a saved dataset directory (or synthetic-flan / synthetic-orcamath)");
                }
                DataSource::File(p.into())
            }
        };
        if let Some(f) = &a.format {
            c.format = Some(parse("format", f)?);
        }
        if let Some(l) = &a.long {
            c.long = parse("long", l)?;
        }
        c.chat_template = a.chat_template.clone();
        c.dataset_cache = a.dataset_cache.clone();
        if let Some(cols) = &a.columns {
            c.columns =
                nopad_data::parse_columns(cols).map_err(|e| anyhow::anyhow!("`columns`: {e}"))?;
        }
        if let Some(l) = &a.loss_on {
            c.loss_on = Some(parse("loss-on", l)?);
        }
        if let Some(s) = &a.strategy {
            c.strategy = parse("strategy", s)?;
        }
        if let Some(s) = &a.schedule {
            c.decay = parse("schedule", s)?;
        }
        if let Some(s) = &a.save_dtype {
            c.save_dtype = parse::<SaveDtype>("save-dtype", s)?;
        }
        let positive = |key: &str, v: Option<usize>, dflt: usize| -> Result<usize> {
            match v {
                Some(0) => bail!("`{key}`: must be at least 1"),
                Some(v) => Ok(v),
                None => Ok(dflt),
            }
        };
        c.batch_size = positive("batch-size", a.batch_size, c.batch_size)?;
        c.grad_accum = positive("grad-accum", a.grad_accum, c.grad_accum)?;
        c.max_len = positive("max-len", a.max_len, c.max_len)?;
        if c.max_len < 8 {
            bail!("`max-len`: {} is too short (at least 8)", c.max_len);
        }
        // A file or preset run without --steps trains one epoch by default.
        if a.steps.is_some() || a.epochs.is_some() || a.data.is_some() || a.model.is_some() {
            c.steps = a.steps;
            c.epochs = a
                .epochs
                .or(if a.steps.is_none() { Some(1.0) } else { None });
        }
        if c.steps == Some(0) {
            bail!("`steps`: must be at least 1");
        }
        if let Some(e) = c.epochs {
            if !(e > 0.0 && e.is_finite()) {
                bail!("`epochs`: {e} must be a positive number");
            }
        }
        if let Some(lr) = a.lr {
            if !(lr > 0.0 && lr.is_finite()) {
                bail!("`lr`: {lr} must be a positive number");
            }
            c.lr = lr;
            c.min_lr = lr * 0.1;
        }
        if let Some(m) = a.min_lr {
            if !(m >= 0.0 && m <= c.lr) {
                bail!("`min-lr`: {m} must lie in [0, lr = {}]", c.lr);
            }
            c.min_lr = m;
        }
        c.warmup = a.warmup.unwrap_or(c.warmup);
        if let Some(r) = a.warmup_ratio {
            if a.warmup.is_some() {
                bail!("`warmup` and `warmup-ratio` both set: give one (steps, or a fraction of the run)");
            }
            if !((0.0..=1.0).contains(&r)) {
                bail!("`warmup-ratio`: {r} must lie in [0, 1]");
            }
            c.warmup_ratio = Some(r);
        }
        if let Some(w) = a.weight_decay {
            if !(w >= 0.0 && w.is_finite()) {
                bail!("`weight-decay`: {w} must be ≥ 0");
            }
            c.adamw.weight_decay = w;
        }
        c.optim_in_backward = a.optim_in_backward.unwrap_or(false);
        if c.optim_in_backward && a.max_grad_norm.is_none() {
            c.adamw.max_grad_norm = None;
        }
        if let Some(g) = a.max_grad_norm {
            if !(g >= 0.0 && g.is_finite()) {
                bail!("`max-grad-norm`: {g} must be ≥ 0 (0 turns clipping off)");
            }
            c.adamw.max_grad_norm = (g > 0.0).then_some(g);
        }
        if let Some(s) = &a.optim_states {
            c.adamw.states = nopad_train::parse_states(s)
                .ok_or_else(|| anyhow::anyhow!("`optim-states`: {s} is not f32, bf16 or 8bit"))?;
        }
        if let Some(s) = &a.master_weights {
            c.adamw.master = nopad_train::parse_master(s)
                .ok_or_else(|| anyhow::anyhow!("`master-weights`: {s} is not f32 or none"))?;
        }
        if let Some(s) = &a.offload {
            let o = nopad_train::parse_offload(s)?;
            (c.offload, c.offload_activations) = (o.optimizer, o.activations);
        }
        c.ranks = a.ranks.unwrap_or(1);
        c.shard = a
            .shard
            .as_deref()
            .map(nopad_train::parse_shard)
            .transpose()?;
        c.seed = a.seed.unwrap_or(c.seed);
        c.skip_bad = a.skip_bad.unwrap_or(false);
        c.strict = a.strict.unwrap_or(false);
        c.group_by_length = a.group_by_length.unwrap_or(false);
        c.out = a.out.clone();
        c.log = a.log.clone();
        c.log_every = match a.log_every {
            Some(0) => bail!("`log-every`: must be at least 1"),
            Some(v) => v,
            None => 1,
        };
        c.eval_data = a.eval_data.clone();
        c.eval_every = a.eval_every;
        c.save_every = a.save_every;
        c.keep = a.keep;
        c.stop_after = a.stop_after;
        c.max_bad_steps = a.max_bad_steps.unwrap_or(c.max_bad_steps);
        c.resume = a.resume.as_deref().map(|r| match r {
            "latest" => Resume::Latest,
            dir => Resume::Dir(dir.into()),
        });
        if let Some(Resume::Dir(d)) = &c.resume {
            if !d.is_dir() {
                bail!(
                    "`resume`: {} is not a directory (give a checkpoint-NNNNNN directory, or \
                     `latest` with --out)",
                    d.display()
                );
            }
        }
        c.lora = a.lora.resolve(c.seed)?;
        c.sample = a.sample.resolve()?;
        c.nan_at_step = a.test_nan_at_step;
        c.save_delay = a.test_save_delay_ms.map(std::time::Duration::from_millis);
        c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        c.progress = !a.no_progress.unwrap_or(false);
        c.recompute = a.recompute.unwrap_or_default();
        c.grad_aliasing = !a.no_grad_aliasing.unwrap_or(false);
        if let Some(g) = a.gpu_memory {
            c.gpu_memory = Some(
                nopad_train::parse_gib(&g.to_string())
                    .map_err(|e| anyhow::anyhow!("`gpu-memory`: {e}"))?,
            );
        }
        c.tensorboard = match a.report_to.as_deref() {
            None | Some("none") => None,
            Some("tensorboard") => {
                let base = c.out.clone().or_else(|| {
                    c.log.as_ref().map(|l| {
                        l.parent()
                            .unwrap_or(std::path::Path::new("."))
                            .to_path_buf()
                    })
                });
                match base {
                    Some(dir) => Some(dir.join("runs")),
                    None => bail!(
                        "`report-to` tensorboard: the event files go into OUT/runs (or the --log                          file's folder/runs): give --out or --log"
                    ),
                }
            }
            Some(other) => bail!("`report-to` {other:?}: expected tensorboard or none"),
        };
        let device = parse("device", a.device.as_deref().unwrap_or("auto"))?;
        let dtype = crate::device::parse_dtype(a.dtype.as_deref().unwrap_or("bf16"))
            .map_err(|e| anyhow::anyhow!("`dtype`: {e}"))?;
        let grads = parse_grad_dtype(a.grad_dtype.as_deref().unwrap_or("auto"))
            .map_err(|e| anyhow::anyhow!("`grad-dtype`: {e}"))?;
        let prec = Precision::with_grads(dtype, grads, c.grad_accum);
        Ok((c, device, prec))
    }
}

/// Exit status of a run that a signal stopped after saving its checkpoint (EX_TEMPFAIL: try
/// again, with `--resume latest`). A second signal exits at once with 128 + its number.
pub const EXIT_INTERRUPTED: i32 = 75;

/// Runs `nopad train`. A run stopped by SIGINT/SIGTERM exits with [`EXIT_INTERRUPTED`] after
/// printing its summary; one stopped by `--stop-after` exits 0.
pub fn run(args: &TrainArgs) -> Result<()> {
    let world = super::dist::world()?;
    if let (Some(n), None) = (args.gpus, &world) {
        // The launcher: its workers parse and check the flags themselves.
        return super::dist::launch(n);
    }
    let (mut cfg, device, dtype) = args.resolve()?;
    if cfg.strategy == nopad_data::Strategy::Concat {
        eprintln!("nopad: warning: {}", nopad_data::CONCAT_WARNING);
    }
    cfg.interrupt = Some(
        nopad_train::install_signal_handlers().context("installing the SIGINT/SIGTERM handlers")?,
    );
    let first = world.as_ref().is_none_or(|w| w.is_first());
    let trained = match &world {
        Some(w) => super::dist::run_worker(w, device, dtype, &cfg),
        None => super::dist::train_on(device, dtype, cfg),
    };
    let summary = match trained {
        Ok(s) => s,
        Err(e) => {
            // Stopped while preparing the data: exit as the signal's default action would.
            if let Some(nopad_train::TrainError::Interrupted(sig)) = e.downcast_ref() {
                eprintln!("nopad: {e}");
                std::process::exit(128 + sig);
            }
            return Err(e);
        }
    };
    if first {
        println!("{summary}");
    }
    if let Some(StopReason::Signal(_)) = summary.stopped {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(EXIT_INTERRUPTED);
    }
    Ok(())
}

#[cfg(test)]
#[path = "train_tests.rs"]
mod tests;
