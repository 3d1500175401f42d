//! The training loop: one optimizer step = the loader's micro-batches, each forward and
//! backward with the loss scaled by 1 / (target tokens of the whole step), then one AdamW update.
//!
//! Loss normalisation is the reason this file exists in this shape: the number of target tokens
//! of a step is known on the host before any forward (the packer counted them), so every
//! micro-batch's gradient is scaled by the same `1/targets_of_step` and the accumulated gradient
//! is exactly that of one big batch, for any strategy and any split into micro-batches.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nopad_backend::Backend;
use nopad_data::{
    synthetic, Batch, BatchStats, Example, Format, Loader, LoaderOptions, LongPolicy, PackOptions,
    Strategy,
};
use nopad_model::weights::{self, SaveDtype};
use nopad_model::{Config, Inputs, Model};
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::eval::evaluate;
use crate::optimizer::{AdamWConfig, Optimizer};
use crate::schedule::{Decay, Schedule};

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
    /// Decay after warm-up.
    pub decay: Decay,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Final checkpoint directory (HF layout).
    pub out: Option<PathBuf>,
    /// Element type of saved weights.
    pub save_dtype: SaveDtype,
    /// JSON-lines log of every logged step.
    pub log: Option<PathBuf>,
    /// Log every this many steps.
    pub log_every: u64,
    /// Held-out data evaluated at the end.
    pub eval_data: Option<PathBuf>,
    /// Draw a progress bar (only on a terminal).
    pub progress: bool,
}

impl TrainConfig {
    /// The built-in default: the small preset on synthetic FLAN-like data with `flatten`,
    /// sized to finish in under two minutes on two CPU cores.
    pub fn default_cpu() -> Self {
        TrainConfig {
            model: ModelSource::Preset("small".into()),
            data: DataSource::Synthetic { dist: synthetic::LengthDist::FlanLike, examples: 4096 },
            format: None,
            long: LongPolicy::Truncate,
            skip_bad: false,
            strategy: Strategy::Flatten,
            batch_size: 16,
            grad_accum: 1,
            max_len: 512,
            group_by_length: false,
            steps: Some(120),
            epochs: None,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 10,
            decay: Decay::Cosine,
            adamw: AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() },
            seed: 0,
            out: None,
            save_dtype: SaveDtype::F32,
            log: None,
            log_every: 1,
            eval_data: None,
            progress: true,
        }
    }
}

/// One logged step (also one line of the `--log` file).
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// 1-based optimizer step.
    pub step: u64,
    /// Epoch the step's data came from.
    pub epoch: u64,
    /// Token-weighted loss of the step.
    pub loss: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-pad) tokens per second of this step.
    pub tokens_per_s: f64,
    /// Target tokens per second of this step.
    pub target_tokens_per_s: f64,
    /// Pad tokens / all tokens laid out.
    pub padding_fraction: f64,
    /// Examples in the step.
    pub examples: usize,
    /// Real tokens in the step.
    pub real_tokens: usize,
    /// Target tokens in the step.
    pub target_tokens: usize,
    /// Seconds since training started.
    pub elapsed_s: f64,
    /// Peak device memory so far.
    pub peak_memory_bytes: usize,
    /// Whether the update was skipped (non-finite gradient).
    pub skipped: bool,
}

/// What a run did, for the final report.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Model description.
    pub model: String,
    /// Parameters.
    pub params: usize,
    /// Device description.
    pub device: String,
    /// Strategy.
    pub strategy: String,
    /// Optimizer steps run.
    pub steps: u64,
    /// Optimizer steps one epoch has with this strategy.
    pub steps_per_epoch: usize,
    /// Examples loaded.
    pub examples: usize,
    /// Totals over the run.
    pub real_tokens: usize,
    /// Pad tokens over the run.
    pub pad_tokens: usize,
    /// Target tokens over the run.
    pub target_tokens: usize,
    /// Training time (excluding loading and saving).
    pub train_seconds: f64,
    /// Real tokens per second over the run.
    pub tokens_per_s: f64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Mean loss of the last 10% of steps (at least one).
    pub last_loss: f64,
    /// Held-out loss at the end, if `eval_data` was given.
    pub eval_loss: Option<f64>,
    /// Steps skipped for non-finite gradients.
    pub skipped_steps: u64,
    /// Peak device memory.
    pub peak_memory_bytes: usize,
    /// Where the final checkpoint went.
    pub out: Option<PathBuf>,
    /// Notes from loading and packing (truncations, warnings).
    pub notes: Vec<String>,
}

/// A model on a backend, from a preset (random init) or an HF directory.
pub fn build_model<B: Backend>(b: &B, source: &ModelSource, seed: u64) -> Result<(Model<B>, String)> {
    match source {
        ModelSource::Preset(name) => {
            let cfg = Config::preset(name).ok_or_else(|| {
                let names: Vec<&str> = nopad_model::PRESETS.iter().map(|p| p.0).collect();
                TrainError::Config(format!(
                    "--model: `{name}` is neither a directory nor a preset (presets: {})",
                    names.join(", ")
                ))
            })?;
            let mut m = Model::new(b, cfg.clone())?;
            let layout = m.layout.clone();
            weights::init_random(&cfg, &layout, seed, |off, v| m.write_params(b, off, v))?;
            Ok((m, format!("preset {name} (random init, seed {seed})")))
        }
        ModelSource::Dir(dir) => {
            let cfg = weights::read_config(dir)?;
            let mut m = Model::new(b, cfg.clone())?;
            let layout = m.layout.clone();
            weights::load_checkpoint(dir, &cfg, &layout, |off, v| m.write_params(b, off, v))?;
            Ok((m, format!("{} ({})", dir.display(), cfg.arch.hf_name())))
        }
    }
}

/// The id pad tokens get: the config's pad id, else its (first) eos id, else 0.
pub fn pad_token_id(cfg: &Config) -> i32 {
    let first = |v: &Option<serde_json::Value>| {
        v.as_ref().and_then(|v| v.as_i64().or_else(|| v.as_array()?.first()?.as_i64()))
    };
    first(&cfg.pad_token_id).or_else(|| first(&cfg.eos_token_id)).unwrap_or(0) as i32
}

/// Loads (or generates) the examples of a data source for a model.
pub fn load_data(
    source: &DataSource,
    model_cfg: &Config,
    model_dir: Option<&std::path::Path>,
    tc: &TrainConfig,
) -> Result<(Vec<Example>, Vec<String>)> {
    match source {
        DataSource::Synthetic { dist, examples } => {
            let ex = synthetic::instruction_dataset(&synthetic::SyntheticConfig {
                n_examples: *examples,
                vocab_size: model_cfg.vocab_size,
                lengths: *dist,
                max_len: tc.max_len,
                seed: tc.seed,
            });
            Ok((ex, vec![]))
        }
        DataSource::File(path) => {
            let opts = nopad_data::LoadOptions {
                format: tc.format,
                max_len: tc.max_len,
                long: tc.long,
                skip_bad: tc.skip_bad,
                vocab_size: Some(model_cfg.vocab_size),
                tokenizer_dir: model_dir.map(|d| d.to_path_buf()),
            };
            let (ex, report) = nopad_data::load_examples(path, &opts)?;
            let mut notes = vec![format!("{}: {report}", path.display())];
            notes.extend(report.warnings.iter().cloned());
            if ex.is_empty() {
                return Err(TrainError::Config(format!("{}: no usable examples", path.display())));
            }
            Ok((ex, notes))
        }
    }
}

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

/// Runs forward and backward over a step's micro-batches and applies one update. Returns the
/// step's token-weighted loss, the gradient norm and whether the update was applied.
pub fn train_step<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    batches: &[Batch],
    lr: f64,
) -> Result<(f64, f64, bool)> {
    let targets: usize = batches.iter().map(|x| x.stats.target_tokens).sum();
    if targets == 0 {
        return Err(TrainError::Config("a step has no target tokens (every label is -100)".into()));
    }
    let scale = 1.0 / targets as f32;
    for batch in batches {
        if batch.is_empty() {
            continue;
        }
        model.forward(b, &inputs(batch), Some(scale))?;
        model.backward(b)?;
    }
    let loss = model.take_loss_sum(b)? / targets as f64;
    let info = if loss.is_finite() {
        opt.update(b, model, lr)?
    } else {
        crate::optimizer::UpdateInfo { grad_norm: f64::NAN, applied: false }
    };
    model.zero_grads(b)?;
    Ok((loss, info.grad_norm, info.applied))
}

fn open_log(path: &Option<PathBuf>) -> Result<Option<std::io::BufWriter<std::fs::File>>> {
    match path {
        None => Ok(None),
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| TrainError::Io { path: dir.to_path_buf(), source: e })?;
            }
            let f = std::fs::File::create(p).map_err(|e| TrainError::Io { path: p.clone(), source: e })?;
            Ok(Some(std::io::BufWriter::new(f)))
        }
    }
}

/// Trains a model as `tc` says, calling `on_step` after every step. Returns the summary.
pub fn train<B: Backend>(b: &B, tc: &TrainConfig, mut on_step: impl FnMut(&StepRecord)) -> Result<Summary> {
    if tc.batch_size == 0 || tc.grad_accum == 0 || tc.max_len < 2 {
        return Err(TrainError::Config("batch-size and grad-accum must be ≥ 1, max-len ≥ 2".into()));
    }
    let (mut model, model_desc) = build_model(b, &tc.model, tc.seed)?;
    let model_dir = match &tc.model {
        ModelSource::Dir(d) => Some(d.as_path()),
        ModelSource::Preset(_) => None,
    };
    let (examples, mut notes) = load_data(&tc.data, &model.cfg, model_dir, tc)?;
    if tc.strategy == Strategy::Concat {
        notes.push("strategy concat: attention crosses examples and positions continue; training is NOT equivalent to padding (shown for comparison only)".into());
    }
    let n_examples = examples.len();
    let pack = PackOptions {
        strategy: tc.strategy,
        batch_size: tc.batch_size,
        max_len: tc.max_len,
        pad_token_id: pad_token_id(&model.cfg),
        group_by_length: tc.group_by_length,
    };
    let mut loader = Loader::new(
        Arc::new(examples),
        LoaderOptions { pack: pack.clone(), grad_accum: tc.grad_accum, seed: tc.seed, shuffle: true, start: Default::default(), prefetch: 4 },
    )?;
    let steps_per_epoch = loader.steps_per_epoch();
    let total = match (tc.steps, tc.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * steps_per_epoch as f64).ceil().max(1.0) as u64,
        (None, None) => steps_per_epoch as u64,
    };
    let schedule = Schedule { lr: tc.lr, min_lr: tc.min_lr, warmup: tc.warmup.min(total), total, decay: tc.decay };
    let mut opt = Optimizer::new(b, &model, tc.adamw)?;
    let mut log = open_log(&tc.log)?;
    let bar = if tc.progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
                .expect("static template is valid"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let start = Instant::now();
    let (mut totals, mut losses, mut skipped) = (BatchStats::default(), Vec::new(), 0u64);
    for step in 1..=total {
        let s = loader.next().ok_or_else(|| TrainError::Config("the data loader stopped early".into()))?;
        let t0 = Instant::now();
        let lr = schedule.lr_at(opt.step + 1);
        let (loss, grad_norm, applied) = train_step(b, &mut model, &mut opt, &s.batches, lr)?;
        b.synchronize()?;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        let st = s.stats();
        totals += st;
        if !applied {
            skipped += 1;
        }
        losses.push(loss);
        let laid_out = (st.real_tokens + st.pad_tokens).max(1);
        let rec = StepRecord {
            step,
            epoch: s.epoch,
            loss,
            lr,
            grad_norm,
            tokens_per_s: st.real_tokens as f64 / dt,
            target_tokens_per_s: st.target_tokens as f64 / dt,
            padding_fraction: st.pad_tokens as f64 / laid_out as f64,
            examples: st.examples,
            real_tokens: st.real_tokens,
            target_tokens: st.target_tokens,
            elapsed_s: start.elapsed().as_secs_f64(),
            peak_memory_bytes: b.peak_memory(),
            skipped: !applied,
        };
        if let Some(w) = log.as_mut() {
            if step % tc.log_every.max(1) == 0 || step == total {
                let line = serde_json::to_string(&rec).expect("records serialise");
                writeln!(w, "{line}").map_err(|e| TrainError::Io { path: tc.log.clone().unwrap_or_default(), source: e })?;
            }
        }
        bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s", rec.tokens_per_s));
        bar.inc(1);
        on_step(&rec);
    }
    bar.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();
    if let Some(mut w) = log {
        w.flush().map_err(|e| TrainError::Io { path: tc.log.clone().unwrap_or_default(), source: e })?;
    }
    let eval_loss = match &tc.eval_data {
        None => None,
        Some(path) => {
            let (ex, _) = load_data(&DataSource::File(path.clone()), &model.cfg, model_dir, tc)?;
            Some(evaluate(b, &mut model, &ex, &pack)?.loss)
        }
    };
    if let Some(out) = &tc.out {
        let weights_buf = opt.weights(&model);
        weights::save_checkpoint(out, &model.cfg, &model.layout, tc.save_dtype, 4 << 30, |r| Ok(b.read(weights_buf, r)?))?;
    }
    let tail = (losses.len() / 10).max(1);
    let last_loss = losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64;
    Ok(Summary {
        model: model_desc,
        params: model.layout.total,
        device: b.describe(),
        strategy: tc.strategy.name().into(),
        steps: total,
        steps_per_epoch,
        examples: n_examples,
        real_tokens: totals.real_tokens,
        pad_tokens: totals.pad_tokens,
        target_tokens: totals.target_tokens,
        train_seconds,
        tokens_per_s: totals.real_tokens as f64 / train_seconds.max(1e-9),
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        last_loss,
        eval_loss,
        skipped_steps: skipped,
        peak_memory_bytes: b.peak_memory(),
        out: tc.out.clone(),
        notes,
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "trained {} ({:.2}M parameters) on {}", self.model, self.params as f64 / 1e6, self.device)?;
        writeln!(
            f,
            "  strategy {}: {} steps ({} per epoch), {} examples, {} real tokens, {} pad tokens, {} target tokens",
            self.strategy, self.steps, self.steps_per_epoch, self.examples, self.real_tokens, self.pad_tokens, self.target_tokens
        )?;
        writeln!(f, "  {:.1} s, {:.0} real tokens/s, peak memory {:.1} MiB", self.train_seconds, self.tokens_per_s, self.peak_memory_bytes as f64 / (1 << 20) as f64)?;
        write!(f, "  loss {:.4} (first step) -> {:.4} (mean of the last steps)", self.first_loss, self.last_loss)?;
        if let Some(e) = self.eval_loss {
            write!(f, "\n  held-out loss {e:.4}")?;
        }
        if self.skipped_steps > 0 {
            write!(f, "\n  {} steps skipped (non-finite gradients)", self.skipped_steps)?;
        }
        if let Some(o) = &self.out {
            write!(f, "\n  checkpoint: {}", o.display())?;
        }
        for n in &self.notes {
            write!(f, "\n  note: {n}")?;
        }
        Ok(())
    }
}
