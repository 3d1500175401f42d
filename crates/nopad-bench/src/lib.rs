//! nopad-bench: trains one model with each packing strategy on the same examples, in the same
//! order, from the same initial weights, and measures what the paper measured: optimizer steps
//! per epoch, real and target tokens/s, MFU, peak memory, padding, and the loss curve, plus the
//! held-out loss at the end. Also exports the initial weights (HF layout) and the exact steps
//! (pretokenized JSONL) so `bench/hf_baseline.py` can train the same thing with HF Transformers.

#![deny(missing_docs)]

pub mod chart;
mod report;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nopad_backend::Backend;
use nopad_data::{Batch, Example, Loader, LoaderOptions, PackOptions, Strategy, IGNORE_INDEX};
use nopad_model::lora::memory::LoraShape;
use nopad_model::weights::{self, SaveDtype};
use nopad_model::Config;
use nopad_train::{
    accumulate, build_lora_model, build_model, build_model_layers, check_device, evaluate, finish,
    model_config, pad_token_id, step_targets, train_step, AdamWConfig, ModelSource, Modes,
    Optimizer, SingleProcess, Trained,
};
use serde::Serialize;

pub use report::{markdown, profile_text, text};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Training failed.
    #[error(transparent)]
    Train(#[from] nopad_train::TrainError),
    /// The model layer failed.
    #[error(transparent)]
    Model(#[from] nopad_model::ModelError),
    /// The data layer failed.
    #[error(transparent)]
    Data(#[from] nopad_data::DataError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] nopad_backend::BackendError),
    /// Writing results failed.
    #[error("{path}: {msg}")]
    Output {
        /// The file.
        path: String,
        /// What failed.
        msg: String,
    },
}

/// Result of a benchmark operation.
pub type Result<T> = std::result::Result<T, BenchError>;

/// One benchmark's settings (shared by every strategy).
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Model.
    pub model: ModelSource,
    /// Keep only this many decoder layers of the model (None: all).
    pub layers: Option<usize>,
    /// Examples per micro-batch (rows for concat/offline).
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Longest example / row.
    pub max_len: usize,
    /// Untimed warm-up steps (they train; their losses are recorded).
    pub warmup: u64,
    /// Timed steps.
    pub steps: u64,
    /// Learning rate (constant, no warm-up: the comparison is about equal steps).
    pub lr: f64,
    /// Seed of the weights and the data order.
    pub seed: u64,
    /// Peak dense bf16 FLOP/s of the device for MFU (measured GEMM ceiling).
    pub peak_flops: f64,
    /// Extra steps, after the evaluation, timed op by op (0: none).
    pub profile_steps: u64,
    /// Recompute activations in the backward.
    pub recompute: nopad_model::Recompute,
    /// Place gradients over dead activations when a step is one micro-batch.
    pub grad_aliasing: bool,
    /// AdamW's moments (`--optim-states`).
    pub optim_states: nopad_train::StatePrecision,
    /// Master weights (`--master-weights`).
    pub master_weights: nopad_train::MasterPrecision,
    /// Update each group in the backward (`--optim-in-backward`; no clipping).
    pub optim_in_backward: bool,
    /// Bytes of device memory the memory plan must fit (default: the device's total).
    pub gpu_memory: Option<usize>,
    /// Train LoRA adapters on a frozen base (the `--lora-*` flags); None: every weight.
    pub lora: Option<nopad_train::LoraTrain>,
    /// Where the optimizer state lives (`--offload optimizer`: the host).
    pub offload: nopad_train::Placement,
    /// Layers whose gate/up projections are offloaded to the host (`--offload activations:K`).
    pub offload_activations: usize,
}

/// What one strategy did.
#[derive(Clone, Debug, Serialize)]
pub struct StrategyResult {
    /// Strategy name.
    pub strategy: String,
    /// Device description (on CUDA with the compute and gradient types).
    pub device: String,
    /// Activation recomputation mode (`none`, `mlp`, `mlp:K`, `full`).
    pub recompute: String,
    /// Whether the gradients lay over dead activations (`Model::set_grad_aliasing`).
    pub grad_aliasing: bool,
    /// Optimizer memory mode: moments, master weights, and `in-backward` when it applies.
    pub optimizer: String,
    /// Optimizer steps one epoch takes.
    pub steps_per_epoch: usize,
    /// Median real tokens/s over the timed steps.
    pub tokens_per_s: f64,
    /// Median target tokens/s.
    pub target_tokens_per_s: f64,
    /// Model FLOPs utilisation (useful FLOPs only: no padding, no masked attention).
    pub mfu: f64,
    /// Median step time in ms, and the spread (min, max).
    pub step_ms: (f64, f64, f64),
    /// Peak bytes held by live buffers (comparable to `torch.cuda.max_memory_allocated`).
    pub peak_memory_bytes: usize,
    /// Peak bytes reserved from the device, allocator cache included.
    pub peak_reserved_bytes: usize,
    /// Per-op time of `profile_steps` extra steps run after everything else (op, ms per step);
    /// the optimizer update is the op `adamw+clip` and `zero_grads`.
    pub profile: Vec<(String, f64)>,
    /// Pad tokens / laid-out tokens over the timed steps.
    pub padding_fraction: f64,
    /// Loss of every step (warm-up included), in order.
    pub losses: Vec<f64>,
    /// Held-out loss after the run.
    pub eval_loss: f64,
}

/// Model FLOPs of one batch that count as useful: 6·N per real token for the matrices (N without
/// the input embedding, a lookup), plus the causal attention of the examples (not of padding):
/// 3 passes × 2 matmuls × 2 FLOPs × Dh·H·Σlen²/2 per layer = 6·Dh·H·L·Σlen². With frozen
/// matrices (`frozen`, LoRA) 4·N: no weight gradient (the adapters' few FLOPs not counted).
pub fn useful_flops(
    cfg: &Config,
    batch: &Batch,
    pad_id: i32,
    strategy: Strategy,
    frozen: bool,
) -> f64 {
    let layout = nopad_model::Layout::new(cfg);
    let embed = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size * cfg.hidden_size
    };
    let n = (layout.total - embed) as f64;
    // The attended lengths: each example's real tokens under padding (trailing pads trimmed),
    // each segment of the row otherwise (whose squares are `stats.sum_len_sq`).
    let lens: Vec<f64> = batch
        .cu_seqlens
        .windows(2)
        .map(|w| {
            let (s, mut e) = (w[0] as usize, w[1] as usize);
            if strategy == Strategy::Pad {
                // Each row is an example plus trailing pads (pad id, no target).
                while e > s + 1
                    && batch.tokens[e - 1] == pad_id
                    && batch.targets[e - 1] == IGNORE_INDEX
                {
                    e -= 1;
                }
            }
            (e - s) as f64
        })
        .collect();
    // Per layer: len² pairs, less the (len - W)² beyond a sliding window W (as
    // `nopad_flash::attention_flops` counts them).
    let sum_sq: f64 = (0..cfg.num_hidden_layers)
        .map(|l| {
            let w = cfg.layer_window(l).map(|w| w as f64);
            lens.iter()
                .map(|&len| match w {
                    Some(w) if w < len => len * len - (len - w) * (len - w),
                    _ => len * len,
                })
                .sum::<f64>()
        })
        .sum();
    let attn = 6.0 * (cfg.head_dim * cfg.num_attention_heads) as f64 * sum_sq;
    let dense = if frozen { 4.0 } else { 6.0 };
    dense * n * batch.stats.real_tokens as f64 + attn
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Builds the model of a benchmark (with `layers` applied) on a backend.
pub fn model<B: Backend>(b: &B, cfg: &BenchConfig) -> Result<nopad_model::Model<B>> {
    let built = match (&cfg.lora, cfg.layers) {
        (Some(lt), layers) => build_lora_model(b, &cfg.model, cfg.seed, layers, lt)?,
        (None, Some(l)) => build_model_layers(b, &cfg.model, cfg.seed, l)?,
        (None, None) => build_model(b, &cfg.model, cfg.seed)?,
    };
    Ok(built.0)
}

/// The training data stream of a benchmark: `strategy`, from the start, shuffled by `cfg.seed`.
fn loader(
    cfg: &BenchConfig,
    strategy: Strategy,
    pad_token_id: i32,
    train: &Arc<Vec<Example>>,
    prefetch: usize,
) -> Result<Loader> {
    let pack = PackOptions {
        strategy,
        batch_size: cfg.batch_size,
        max_len: cfg.max_len,
        pad_token_id,
        group_by_length: false,
    };
    let opts = LoaderOptions {
        pack,
        grad_accum: cfg.grad_accum,
        seed: cfg.seed,
        shuffle: true,
        start: Default::default(),
        prefetch,
        parallel: nopad_data::DataParallel::ALONE,
    };
    Ok(Loader::new(train.clone(), opts)?)
}

/// Trains `cfg.warmup + cfg.steps` steps with `strategy` on `train`, then evaluates on `heldout`.
pub fn run_strategy<B: Backend>(
    b: &B,
    cfg: &BenchConfig,
    strategy: Strategy,
    train: &Arc<Vec<Example>>,
    heldout: &[Example],
    mut progress: impl FnMut(u64, f64),
) -> Result<StrategyResult> {
    let aliasing =
        cfg.grad_aliasing && cfg.grad_accum == 1 && !cfg.optim_in_backward && cfg.lora.is_none();
    if cfg.optim_in_backward && cfg.grad_accum != 1 {
        return Err(nopad_train::TrainError::Config(
            "--optim-in-backward takes steps of one micro-batch: use --grad-accum 1".into(),
        )
        .into());
    }
    let adamw = AdamWConfig {
        weight_decay: 0.0,
        states: cfg.optim_states,
        master: cfg.master_weights,
        // The update in the backward cannot clip (see nopad_train's step).
        max_grad_norm: if cfg.optim_in_backward {
            None
        } else {
            AdamWConfig::default().max_grad_norm
        },
        ..AdamWConfig::default()
    };
    let tokens = plan_run(b, cfg, strategy, train, &adamw, aliasing)?;
    let mut model = model(b, cfg)?;
    model.set_recompute(cfg.recompute);
    model.set_offload_activations(cfg.offload_activations)?;
    model.set_grad_aliasing(b, aliasing)?;
    model.set_update_in_backward(b, cfg.optim_in_backward)?;
    if cfg.offload_activations > 0 {
        model.reserve_activations(b, tokens)?;
    }
    let pad_id = pad_token_id(&model.cfg);
    let mut loader = loader(cfg, strategy, pad_id, train, 4)?;
    let steps_per_epoch = loader.steps_per_epoch();
    let mut opt = Optimizer::with_placement(b, &model, adamw, cfg.offload)?;
    if cfg.optim_in_backward {
        opt.check_group_blocks()?;
    }
    let (mut losses, mut times, mut tok, mut tgt) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut real, mut padded, mut flops, mut secs) = (0usize, 0usize, 0.0f64, 0.0f64);
    b.synchronize()?;
    for k in 0..cfg.warmup + cfg.steps {
        let step = loader
            .next()
            .ok_or_else(|| nopad_train::TrainError::Config("the loader stopped".into()))?;
        model.set_lora_step(k);
        let t0 = Instant::now();
        let loss = train_step(
            b,
            &SingleProcess,
            &mut model,
            &mut opt,
            &step.batches,
            cfg.lr,
        )?
        .loss;
        b.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        losses.push(loss);
        progress(k + 1, loss);
        if k >= cfg.warmup {
            let st = step.stats();
            times.push(dt * 1e3);
            tok.push(st.real_tokens as f64 / dt);
            tgt.push(st.target_tokens as f64 / dt);
            real += st.real_tokens;
            padded += st.pad_tokens;
            flops += step
                .batches
                .iter()
                .map(|x| useful_flops(&model.cfg, x, pad_id, strategy, cfg.lora.is_some()))
                .sum::<f64>();
            secs += dt;
        }
    }
    let peak = b.peak_memory();
    let eval_pack = PackOptions {
        strategy: Strategy::Flatten,
        batch_size: cfg.batch_size,
        max_len: cfg.max_len,
        pad_token_id: pad_id,
        group_by_length: false,
    };
    let eval_loss = evaluate(b, &mut model, heldout, &eval_pack)?.loss;
    let peak_reserved = b.peak_reserved_memory();
    let profile = if cfg.profile_steps > 0 {
        profile_steps(b, &mut model, &mut opt, &mut loader, cfg)?
    } else {
        Vec::new()
    };
    let lo = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = times.iter().cloned().fold(0.0, f64::max);
    Ok(StrategyResult {
        strategy: strategy.name().into(),
        device: b.describe(),
        recompute: match cfg.offload_activations {
            0 => cfg.recompute.to_string(),
            k => format!("{}, activations of {k} layers offloaded", cfg.recompute),
        },
        grad_aliasing: aliasing,
        optimizer: format!(
            "moments {}, master {}{}{}{}",
            nopad_train::states_name(cfg.optim_states),
            nopad_train::master_name(cfg.master_weights),
            if cfg.optim_in_backward {
                ", in backward"
            } else {
                ""
            },
            cfg.lora.as_ref().map_or(String::new(), |lt| format!(
                ", LoRA r {} alpha {} base {}",
                lt.settings.r,
                lt.settings.alpha,
                lt.base.name()
            )),
            if cfg.offload == nopad_train::Placement::Host {
                ", offloaded to the host"
            } else {
                ""
            }
        ),
        steps_per_epoch,
        tokens_per_s: median(&mut tok),
        target_tokens_per_s: median(&mut tgt),
        mfu: flops / secs.max(1e-12) / cfg.peak_flops,
        step_ms: (median(&mut times), lo, hi),
        peak_memory_bytes: peak,
        peak_reserved_bytes: peak_reserved,
        profile,
        padding_fraction: padded as f64 / (real + padded).max(1) as f64,
        losses,
        eval_loss,
    })
}

/// Prints the memory plan of a benchmark run (its largest micro-batch found by packing the
/// steps it will time) and refuses one that cannot fit, before the model is allocated; returns
/// that micro-batch's tokens.
fn plan_run<B: Backend>(
    b: &B,
    cfg: &BenchConfig,
    strategy: Strategy,
    train: &Arc<Vec<Example>>,
    adamw: &AdamWConfig,
    aliasing: bool,
) -> Result<usize> {
    let mut mc = model_config(&cfg.model)?;
    if let Some(l) = cfg.layers {
        mc.num_hidden_layers = l.min(mc.num_hidden_layers).max(1);
    }
    let mut scan = loader(cfg, strategy, pad_token_id(&mc), train, 1)?;
    let mut tokens = 0;
    for _ in 0..cfg.warmup + cfg.steps {
        let Some(step) = scan.next() else { break };
        tokens = step
            .batches
            .iter()
            .map(|x| x.tokens.len())
            .fold(tokens, usize::max);
    }
    let modes = Modes {
        states: adamw.states,
        master: adamw.master,
        recompute: cfg.recompute,
        grad_aliasing: aliasing,
        optim_in_backward: cfg.optim_in_backward,
        offload: cfg.offload == nopad_train::Placement::Host,
        offload_acts: cfg.offload_activations,
        trained: match &cfg.lora {
            Some(l) => Trained::Lora(LoraShape::of(&l.settings, l.base)),
            None => Trained::Full,
        },
        ranks: 1,
        shard: 0,
    };
    let in_backward = cfg.grad_accum == 1 && cfg.lora.is_none();
    check_device(b, &mc, tokens, modes, cfg.gpu_memory, in_backward)?;
    Ok(tokens)
}

/// Runs `cfg.profile_steps` more steps with every op timed; returns ms per step for each op.
fn profile_steps<B: Backend>(
    b: &B,
    model: &mut nopad_model::Model<B>,
    opt: &mut Optimizer<B>,
    loader: &mut Loader,
    cfg: &BenchConfig,
) -> Result<Vec<(String, f64)>> {
    use std::collections::BTreeMap;
    let mut extra: BTreeMap<&str, f64> = BTreeMap::new();
    model.set_profiling(true);
    for _ in 0..cfg.profile_steps {
        let step = loader
            .next()
            .ok_or_else(|| nopad_train::TrainError::Config("the loader stopped".into()))?;
        if model.updates_in_backward() {
            // The update runs inside the backward, timed as the model's "group hook" op.
            train_step(b, &SingleProcess, model, opt, &step.batches, cfg.lr)?;
            continue;
        }
        let targets = step_targets::<B>(&SingleProcess, &step.batches)?;
        accumulate(b, model, &step.batches, 1.0 / targets as f32)?;
        b.synchronize()?;
        let t = Instant::now();
        finish(b, &SingleProcess, model, opt, targets, cfg.lr)?;
        b.synchronize()?;
        *extra.entry("adamw+clip").or_default() += t.elapsed().as_secs_f64();
        let t = Instant::now();
        model.zero_grads(b)?;
        b.synchronize()?;
        *extra.entry("zero_grads").or_default() += t.elapsed().as_secs_f64();
    }
    model.set_profiling(false);
    let k = cfg.profile_steps as f64;
    let mut v: Vec<(String, f64)> = model
        .take_profile(b)?
        .into_iter()
        .map(|(l, s, _)| (l.to_string(), s * 1e3 / k))
        .collect();
    v.extend(extra.into_iter().map(|(l, s)| (l.to_string(), s * 1e3 / k)));
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(v)
}

/// Writes what `bench/hf_baseline.py` needs to train the same run with HF Transformers: the
/// initial weights in HF layout (`DIR/model/`), and `DIR/steps.jsonl`, one line per optimizer
/// step holding its micro-batches' examples (`input_ids`, `labels`) in nopad's order, plus
/// `DIR/heldout.jsonl`.
pub fn export<B: Backend>(
    b: &B,
    cfg: &BenchConfig,
    train: &Arc<Vec<Example>>,
    heldout: &[Example],
    dir: &Path,
) -> Result<()> {
    let out_err = |p: &Path, e: &dyn std::fmt::Display| BenchError::Output {
        path: p.display().to_string(),
        msg: e.to_string(),
    };
    let model = model(b, cfg)?;
    // Weights computed in bf16 are bf16 values: bf16 files hold them exactly, at half the size
    // (16 GB instead of 32 for an 8B model).
    let dtype = if b.needs_master() {
        SaveDtype::Bf16
    } else {
        SaveDtype::F32
    };
    weights::save_checkpoint(
        &dir.join("model"),
        &model.cfg,
        &model.layout,
        dtype,
        4 << 30,
        |r| Ok(b.read(&model.params, r)?),
    )?;
    if let (Some(lt), Some(al)) = (&cfg.lora, model.adapter_layout()) {
        // The initial adapter, exactly as nopad starts from it (bf16 values on CUDA), in f32.
        let vals = b.read(model.trainable(), 0..al.total)?;
        let base = dir.join("model").display().to_string();
        let adir = dir.join("adapter");
        nopad_model::lora::save_adapter(&adir, &lt.settings, al, SaveDtype::F32, &base, &vals)?;
    }
    let pad_id = pad_token_id(&model.cfg);
    let mut loader = loader(cfg, Strategy::Flatten, pad_id, train, 2)?;
    let path = dir.join("steps.jsonl");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| out_err(&path, &e))?);
    for _ in 0..cfg.warmup + cfg.steps {
        let step = loader
            .next()
            .ok_or_else(|| nopad_train::TrainError::Config("the loader stopped".into()))?;
        let micro: Vec<Vec<serde_json::Value>> =
            step.batches.iter().map(examples_of_flat_batch).collect();
        writeln!(f, "{}", serde_json::json!({ "micro_batches": micro }))
            .map_err(|e| out_err(&path, &e))?;
    }
    f.flush().map_err(|e| out_err(&path, &e))?;
    let path = dir.join("heldout.jsonl");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| out_err(&path, &e))?);
    for e in heldout {
        writeln!(
            f,
            "{}",
            serde_json::json!({"input_ids": e.input_ids, "labels": e.labels})
        )
        .map_err(|e| out_err(&path, &e))?;
    }
    f.flush().map_err(|e| out_err(&path, &e))
}

/// The examples of a flatten batch, in HF convention (labels aligned with input_ids; the first
/// label of each example is -100, the rest are the shifted targets).
fn examples_of_flat_batch(batch: &Batch) -> Vec<serde_json::Value> {
    batch
        .cu_seqlens
        .windows(2)
        .filter(|w| w[1] > w[0])
        .map(|w| {
            let (s, e) = (w[0] as usize, w[1] as usize);
            let mut labels = vec![IGNORE_INDEX];
            labels.extend_from_slice(&batch.targets[s..e - 1]);
            serde_json::json!({"input_ids": &batch.tokens[s..e], "labels": labels})
        })
        .collect()
}

#[cfg(test)]
mod tests;
