//! `nopad bench`: every strategy on the same model, examples and order; the paper's table,
//! JSON, Markdown and SVG charts; optionally the export for the HF baseline.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use nopad_backend::cuda::CudaDtype;
use nopad_backend::Backend;
use nopad_bench::{BenchConfig, StrategyResult};
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{Example, LoadOptions, Strategy};
use nopad_train::ModelSource;

use crate::device::{
    parse_dtype, parse_grad_dtype, run_on, DeviceChoice, GradDtype, Job, Precision,
};

/// What `nopad bench` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BenchTarget {
    /// Training with each strategy (the default). The attention kernels alone are timed by
    /// the `flash-check bench` binary of nopad-flash-check.
    #[default]
    Train,
}

/// Flags of `nopad bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// `train` (the default and only target).
    #[arg(value_enum, default_value_t = BenchTarget::Train)]
    pub target: BenchTarget,
    /// Model: HF directory or preset.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub model: String,
    /// Keep only the first N decoder layers of a preset (to fit a quick run).
    #[arg(long)]
    pub layers: Option<usize>,
    /// synthetic-flan (median 180 tokens), synthetic-orcamath (median 550), or a data file.
    #[arg(long, default_value = "synthetic-flan")]
    pub data: String,
    /// Examples generated for synthetic data.
    #[arg(long, default_value_t = 4000)]
    pub examples: usize,
    /// Strategies to compare, comma-separated.
    #[arg(
        long,
        default_value = "pad,concat,flatten,offline",
        value_delimiter = ','
    )]
    pub strategies: Vec<Strategy>,
    /// Examples per micro-batch (rows for concat and offline).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest example / row.
    #[arg(long, default_value_t = 4096)]
    pub max_len: usize,
    /// Untimed warm-up steps (they still train).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: u64,
    /// Constant learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Seed of weights and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Compute type on CUDA: bf16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: CudaDtype,
    /// Parameter gradients on CUDA in bf16 mode: auto (bf16 when a step is one micro-batch,
    /// else f32), f32 or bf16 (2 bytes per parameter less; each GEMM accumulates in fp32 and
    /// rounds once per write).
    #[arg(long = "grad-dtype", default_value = "auto", value_parser = parse_grad_dtype)]
    pub grad_dtype: GradDtype,
    /// Peak dense TFLOP/s for MFU (default: the bf16 GEMM ceiling measured on the H200).
    #[arg(long, default_value_t = 790.0)]
    pub peak_tflops: f64,
    /// Activation recomputation: none, mlp (drop the gate/up projections and redo that GEMM in
    /// the backward) or full (keep only each layer's input); a bare --recompute means full.
    #[arg(long, default_value = "none", default_missing_value = "full", num_args = 0..=1)]
    pub recompute: nopad_model::Recompute,
    /// Keep the parameter gradients in a buffer of their own (by default, with one micro-batch
    /// per step, they lie over activations that are dead by the time each is written).
    #[arg(long)]
    pub no_grad_aliasing: bool,
    /// AdamW's moments: f32 (8 bytes per parameter), bf16 (4) or 8bit (about 2.03).
    #[arg(long, default_value = "f32", value_parser = parse_states)]
    pub optim_states: nopad_train::StatePrecision,
    /// Master weights: f32 (an fp32 copy beside the bf16 weights) or none (stochastic rounding).
    #[arg(long, default_value = "f32", value_parser = parse_master)]
    pub master_weights: nopad_train::MasterPrecision,
    /// Update each group inside the backward, keeping one group's gradient at a time (no
    /// gradient clipping; steps of one micro-batch).
    #[arg(long)]
    pub optim_in_backward: bool,
    /// Device memory in GiB the memory plan must fit (default: the device's total).
    #[arg(long, value_name = "GIB", value_parser = nopad_train::parse_gib)]
    pub gpu_memory: Option<usize>,
    /// What lives in host memory, comma-separated: `optimizer` (the fp32 weights and moments,
    /// updated on the host's cores) and `activations:K` (the gate/up projections of K layers,
    /// spread over the stack, between their forward and backward; results unchanged).
    #[arg(long, value_name = "optimizer,activations:K", value_parser = parse_offload)]
    pub offload: Option<nopad_train::Offload>,
    /// After the run, time this many more steps op by op and print the breakdown.
    #[arg(long, default_value_t = 0)]
    pub profile_steps: u64,
    /// Directory for results.json, results.md and the SVG charts.
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Also write the initial weights and the exact steps for bench/hf_baseline.py here (and,
    /// with LoRA, the initial adapter in DIR/adapter for its --init-adapter).
    #[arg(long)]
    pub export: Option<PathBuf>,
    #[command(flatten)]
    pub lora: super::lora::LoraArgs,
}

fn parse_states(s: &str) -> std::result::Result<nopad_train::StatePrecision, String> {
    nopad_train::parse_states(s).ok_or_else(|| format!("`{s}` is not f32, bf16 or 8bit"))
}

fn parse_master(s: &str) -> std::result::Result<nopad_train::MasterPrecision, String> {
    nopad_train::parse_master(s).ok_or_else(|| format!("`{s}` is not f32 or none"))
}

fn parse_offload(s: &str) -> std::result::Result<nopad_train::Offload, String> {
    nopad_train::parse_offload(s).map_err(|e| e.to_string())
}

fn examples(a: &BenchArgs, vocab: usize) -> Result<Vec<Example>> {
    let dist = match a.data.as_str() {
        "synthetic-flan" => LengthDist::FlanLike,
        "synthetic-orcamath" => LengthDist::OrcaMathLike,
        path => {
            let mut opts = LoadOptions::new(a.max_len);
            opts.vocab_size = Some(vocab);
            if std::path::Path::new(&a.model).is_dir() {
                opts.tokenizer_dir = Some(a.model.clone().into());
            }
            let (ex, report) = nopad_data::load_examples(std::path::Path::new(path), &opts)?;
            eprintln!("nopad bench: {path}: {report}");
            return Ok(ex);
        }
    };
    Ok(instruction_dataset(&SyntheticConfig {
        n_examples: a.examples,
        vocab_size: vocab,
        lengths: dist,
        max_len: a.max_len,
        seed: a.seed,
    }))
}

struct StrategyJob<'a> {
    cfg: &'a BenchConfig,
    strategy: Strategy,
    train: &'a Arc<Vec<Example>>,
    heldout: &'a [Example],
    export: Option<&'a std::path::Path>,
}

impl Job for StrategyJob<'_> {
    type Out = StrategyResult;
    fn run<B: Backend>(self, b: &B) -> Result<StrategyResult> {
        if let Some(dir) = self.export {
            nopad_bench::export(b, self.cfg, self.train, self.heldout, dir)?;
            // As `train --out` does: the export then loads in HF with its own tokenizer.
            if let ModelSource::Dir(src) = &self.cfg.model {
                nopad_model::weights::copy_tokenizer_files(src, dir)?;
            }
            eprintln!(
                "nopad bench: exported the initial weights and steps to {}",
                dir.display()
            );
        }
        let total = self.cfg.warmup + self.cfg.steps;
        let name = self.strategy.name();
        let r = nopad_bench::run_strategy(
            b,
            self.cfg,
            self.strategy,
            self.train,
            self.heldout,
            |k, loss| {
                eprint!("\r  {name:<8} step {k}/{total}  loss {loss:.4}   ");
            },
        )
        .inspect_err(|e| {
            use nopad_backend::BackendError::OutOfMemory;
            use nopad_bench::BenchError as E;
            if match e {
                E::Train(t) => nopad_train::is_out_of_memory(t),
                E::Model(nopad_model::ModelError::Backend(OutOfMemory { .. })) => true,
                E::Backend(OutOfMemory { .. }) => true,
                _ => false,
            } {
                eprintln!();
                nopad_train::print_plan_for_out_of_memory();
            }
        })?;
        eprintln!();
        Ok(r)
    }
}

/// Runs `nopad bench`.
pub fn run(a: &BenchArgs) -> Result<()> {
    if a.batch_size == 0 || a.grad_accum == 0 || a.steps == 0 {
        bail!("--batch-size, --grad-accum and --steps must be at least 1");
    }
    let model = super::model_source(&a.model)?;
    let vocab = match &model {
        ModelSource::Preset(p) => {
            nopad_model::Config::preset(p)
                .with_context(|| format!("--model: unknown preset `{p}`"))?
                .vocab_size
        }
        ModelSource::Dir(d) => nopad_model::weights::read_config(d)?.vocab_size,
    };
    let cfg = BenchConfig {
        model,
        layers: a.layers,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        warmup: a.warmup,
        steps: a.steps,
        lr: a.lr,
        seed: a.seed,
        peak_flops: a.peak_tflops * 1e12,
        profile_steps: a.profile_steps,
        recompute: a.recompute,
        grad_aliasing: !a.no_grad_aliasing,
        optim_states: a.optim_states,
        master_weights: a.master_weights,
        optim_in_backward: a.optim_in_backward,
        gpu_memory: a.gpu_memory,
        lora: a.lora.resolve(a.seed)?,
        offload: a.offload.unwrap_or_default().optimizer,
        offload_activations: a.offload.unwrap_or_default().activations,
    };
    let mut all = examples(a, vocab)?;
    // The last 5% (at least one example) are held out for the final evaluation.
    let held = (all.len() / 20).max(1);
    if all.len() < held + 1 {
        bail!("--data: need at least two examples");
    }
    let heldout = all.split_off(all.len() - held);
    let train = Arc::new(all);
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let mut results = Vec::new();
    for (i, &s) in a.strategies.iter().enumerate() {
        let export = if i == 0 { a.export.as_deref() } else { None };
        // A fresh backend per strategy, so peak memory is each strategy's own.
        results.push(run_on(
            a.device,
            Precision::with_grads(a.dtype, a.grad_dtype, a.grad_accum),
            StrategyJob {
                cfg: &cfg,
                strategy: s,
                train: &train,
                heldout: &heldout,
                export,
            },
        )?);
    }
    let table = nopad_bench::text(&results);
    println!("{table}");
    let profile = nopad_bench::profile_text(&results);
    if !profile.is_empty() {
        println!("{profile}");
    }
    let json = serde_json::json!({
        "model": a.model, "layers": a.layers, "data": a.data, "batch_size": a.batch_size,
        "grad_accum": a.grad_accum, "max_len": a.max_len, "warmup": a.warmup, "steps": a.steps,
        "lr": a.lr, "seed": a.seed, "peak_tflops": a.peak_tflops, "results": results,
    });
    let write = |name: &str, text: String| -> Result<()> {
        let p = a.out.join(name);
        std::fs::write(&p, text).with_context(|| format!("{}: cannot write", p.display()))
    };
    write("results.json", serde_json::to_string_pretty(&json)?)?;
    write("results.md", nopad_bench::markdown(&results))?;
    nopad_bench::chart::write_all(&a.out, &results)?;
    eprintln!("nopad bench: results in {}", a.out.display());
    Ok(())
}
