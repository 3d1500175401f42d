//! `nopad stats`: what each packing strategy would do with a dataset, before any training.
//!
//! Glue only: loads the file with nopad-data's loader (same formats, masking and long policy as
//! training), asks `strategy_stats` for every strategy's epoch, and prints text, JSON or an SVG
//! histogram. With `--gpu-memory GIB` also the memory plan of `--model` (a directory or a
//! preset) on a CUDA device of that size, for every mode worth comparing (nopad-train's
//! `plan`), with the largest micro-batch each fits; with `--gpus N` also the plan of every ZeRO
//! stage for N ranks, per rank.

use std::path::PathBuf;

use anyhow::{bail, ensure, Context};
use nopad_data::synthetic::{instruction_dataset, LengthDist, SyntheticConfig};
use nopad_data::{load_examples, strategy_stats, PackOptions, Strategy};

/// Arguments of `nopad stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Examples: JSONL, or a .json array (pretokenized, text, prompt-completion, messages,
    /// sharegpt or alpaca records); or `synthetic-flan` / `synthetic-orcamath` (the built-in length
    /// distributions of `nopad bench` and `nopad train`).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Number of synthetic examples (with `--data synthetic-*`).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub examples: usize,
    /// Seed of the synthetic examples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model directory with tokenizer.json and tokenizer_config.json (needed for text formats),
    /// or, for the memory plan only, a preset name.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Print the memory plan of `--model` on a CUDA device of this many GiB (bf16 weights):
    /// every optimizer-state, master-weight and recomputation mode, with the largest
    /// micro-batch in tokens that fits each.
    #[arg(long, value_name = "GIB", value_parser = nopad_train::parse_gib)]
    pub gpu_memory: Option<usize>,
    /// With `--gpu-memory`: plan for N GPUs of that size training data parallel, and print
    /// every `--shard` stage's plan per rank, with the largest micro-batch per rank each fits.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gpus: usize,
    /// Longest example (and row length for concat and offline).
    #[arg(long, value_name = "N")]
    pub max_len: usize,
    /// Examples per micro-batch (rows for concat and offline).
    #[arg(long, value_name = "B")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub grad_accum: usize,
    #[command(flatten)]
    pub loader: super::LoaderArgs,
    /// Target tokens (assistant, completion or all), as `nopad train --loss-on`.
    #[arg(long, value_name = "WHICH")]
    pub loss_on: Option<nopad_data::LossOn>,
    /// Check token ids against this vocabulary size (default: the tokenizer's, if any).
    #[arg(long, value_name = "V")]
    pub vocab_size: Option<usize>,
    /// Length-grouped sampling for pad (and flatten, which keeps pad's examples).
    #[arg(long)]
    pub group_by_length: bool,
    /// Print one JSON object keyed by strategy name instead of text.
    #[arg(long)]
    pub json: bool,
    /// With `--gpu-memory` and `--lora-r`: the plan of LoRA (or QLoRA, `--base-dtype nf4`)
    /// training instead of full fine-tuning, over both base precisions.
    #[command(flatten)]
    pub lora: super::lora::LoraArgs,
    /// Also draw the length histogram to this .svg file.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// Runs `nopad stats`.
pub fn run(args: &StatsArgs) -> anyhow::Result<()> {
    ensure!(args.max_len >= 1, "--max-len must be at least 1");
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(args.grad_accum >= 1, "--grad-accum must be at least 1");
    ensure!(args.gpus >= 1, "--gpus must be at least 1");
    let mut opts = args.loader.options(args.max_len);
    opts.vocab_size = args.vocab_size;
    opts.loss_on = args.loss_on;
    let model = args.model.as_deref().map(super::model_path).transpose()?;
    // A preset name is not a tokenizer directory.
    let preset = model
        .as_ref()
        .filter(|m| !m.is_dir())
        .and_then(|m| m.to_str())
        .and_then(nopad_model::Config::preset);
    if preset.is_none() {
        opts.tokenizer_dir = model.clone();
    }
    let synthetic = match args.data.to_str() {
        Some("synthetic-flan") => Some(LengthDist::FlanLike),
        Some("synthetic-orcamath") => Some(LengthDist::OrcaMathLike),
        _ => None,
    };
    let (examples, load) = match synthetic {
        Some(lengths) => {
            ensure!(args.examples >= 1, "--examples must be at least 1");
            let ex = instruction_dataset(&SyntheticConfig {
                n_examples: args.examples,
                vocab_size: args.vocab_size.unwrap_or(32_000),
                lengths,
                max_len: args.max_len,
                seed: args.seed,
            });
            eprintln!("{}: {} synthetic examples", args.data.display(), ex.len());
            (ex, None)
        }
        None => {
            let (examples, load) = load_examples(&args.data, &opts)
                .with_context(|| format!("cannot compute statistics of {}", args.data.display()))?;
            for w in &load.warnings {
                eprintln!("warning: {w}");
            }
            eprintln!("{}: {load}", args.data.display());
            (examples, Some(load))
        }
    };
    let pack = PackOptions {
        strategy: Strategy::Flatten,
        batch_size: args.batch_size,
        max_len: args.max_len,
        pad_token_id: 0,
        group_by_length: args.group_by_length,
    };
    let mut report = strategy_stats(&examples, &pack, args.grad_accum);
    if let Some(load) = &load {
        report.add_load_report(load);
    }
    if let Some(plot) = &args.plot {
        report
            .write_svg(plot)
            .with_context(|| "cannot write the --plot chart")?;
        eprintln!("length histogram written to {}", plot.display());
    }
    if args.json {
        println!("{:#}", report.to_json());
    } else {
        println!("{report}");
    }
    if let Some(budget) = args.gpu_memory {
        let cfg = match (preset, &model) {
            (Some(cfg), _) => cfg,
            (None, Some(dir)) => nopad_model::weights::read_config(dir)?,
            (None, None) => bail!("--gpu-memory needs --model (a model directory or a preset)"),
        };
        let lora = args.lora.resolve(args.seed)?;
        let at = (args.grad_accum, args.gpus);
        let text = memory_table(&cfg, (&examples, &pack), at, budget, lora);
        // JSON output stays one object on stdout; the table then goes to stderr.
        if args.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
    Ok(())
}

/// The memory plan of every mode worth comparing, on `gpus` CUDA devices of `budget` bytes,
/// at the largest `flatten` micro-batch of the data, then (several GPUs) the plan of every ZeRO
/// stage per rank. With `lora`, the modes are the adapters over a bf16 and an NF4 base, each
/// with and without recomputation and offloaded activations (the adapters' own optimizer state
/// is too small for its precision to matter).
fn memory_table(
    cfg: &nopad_model::Config,
    (examples, pack): (&[nopad_data::Example], &PackOptions),
    (grad_accum, gpus): (usize, usize),
    budget: usize,
    lora: Option<nopad_train::LoraTrain>,
) -> String {
    use nopad_train::{Modes, Trained};
    let tokens = nopad_train::largest_micro_batch(examples, pack);
    let one = grad_accum == 1;
    // bf16 gradients when a step is one micro-batch, as `--grad-dtype auto` chooses.
    let dev = nopad_train::DeviceSizes::cuda_bf16(one);
    let base = Modes {
        states: nopad_train::StatePrecision::F32,
        master: nopad_train::MasterPrecision::F32,
        recompute: nopad_model::Recompute::None,
        grad_aliasing: one,
        optim_in_backward: false,
        offload: false,
        offload_acts: 0,
        trained: Trained::Full,
        ranks: gpus,
        shard: 0,
    };
    let grid = match &lora {
        None => nopad_train::mode_grid(base, one && gpus == 1),
        Some(l) => lora_grid(base, &l.settings, cfg.num_hidden_layers),
    };
    let mut text = format!(
        "memory plan on a {} CUDA device (bf16, {} gradients), largest flatten micro-batch {tokens} tokens; sizes in GiB:\n{}",
        nopad_train::gib(budget),
        if one { "bf16" } else { "fp32" },
        nopad_train::table(cfg, tokens, &grid, &dev, budget)
    );
    if gpus > 1 {
        // The first row's modes at every stage: what sharding saves on its own.
        let stages = nopad_train::stage_grid(grid.first().copied().unwrap_or(base));
        text += &format!(
            "\nper rank of {gpus} GPUs, by --shard stage (stage 3 gathers two layers and the embedding, head and norm):\n{}",
            nopad_train::table(cfg, tokens, &stages, &dev, budget)
        );
    }
    text
}

/// LoRA's rows of the memory table: bf16 and NF4 bases, with no, MLP and full recomputation.
/// The LoRA modes: each base with no, MLP and full recomputation, and with every other layer's
/// gate/up projections offloaded to the host (`--offload activations:L/2`), alone and with the
/// rest recomputed.
fn lora_grid(
    base: nopad_train::Modes,
    lora: &nopad_model::lora::LoraConfig,
    n_layers: usize,
) -> Vec<nopad_train::Modes> {
    use nopad_model::{lora::memory::LoraShape, quant::BaseDtype, Recompute};
    let mut v = Vec::new();
    let half = n_layers / 2;
    for dtype in [BaseDtype::Bf16, BaseDtype::Nf4] {
        for (recompute, offload_acts) in [
            (Recompute::None, 0),
            (Recompute::None, half),
            (Recompute::Mlp(None), half),
            (Recompute::Mlp(None), 0),
            (Recompute::Full, 0),
        ] {
            v.push(nopad_train::Modes {
                recompute,
                offload_acts,
                // A LoRA run keeps its (small) adapter gradients apart.
                grad_aliasing: false,
                trained: nopad_train::Trained::Lora(LoraShape::of(lora, dtype)),
                ..base
            });
        }
    }
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest micro-batch that fits (the last column, 0: none) of each row whose label
    /// starts with `label` and ends with `stage`.
    fn fits(text: &str, label: &str, stage: &str) -> Vec<usize> {
        text.lines()
            .filter(|l| l.starts_with(label) && l.contains(stage))
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                match words.iter().position(|w| *w == "tokens") {
                    Some(i) => words[i - 1].parse().unwrap(),
                    None => 0,
                }
            })
            .collect()
    }

    /// Llama-3.1-8B's config, 64 FLAN-like examples of up to 2,048 tokens and batches of 4.
    fn flan_8b() -> (nopad_model::Config, Vec<nopad_data::Example>, PackOptions) {
        let cfg = nopad_model::Config::preset("llama-3.1-8b").unwrap();
        let examples = instruction_dataset(&SyntheticConfig {
            n_examples: 64,
            vocab_size: cfg.vocab_size,
            lengths: LengthDist::FlanLike,
            max_len: 2048,
            seed: 0,
        });
        let pack = PackOptions {
            strategy: Strategy::Flatten,
            batch_size: 4,
            max_len: 2048,
            pad_token_id: 0,
            group_by_length: false,
        };
        (cfg, examples, pack)
    }

    /// The LoRA table: each base with and without recomputation and offloaded activations;
    /// offloading every other layer fits more tokens than keeping them, and less than
    /// recomputing every layer's MLP (which frees one more layer's projections).
    #[test]
    fn lora_rows_include_offloaded_activations() {
        let (cfg, examples, pack) = flan_8b();
        let lora = nopad_train::LoraTrain {
            settings: nopad_model::lora::LoraConfig {
                r: 16,
                alpha: 32.0,
                dropout: 0.0,
                targets: nopad_model::lora::Target::ALL.to_vec(),
                use_rslora: false,
                seed: 0,
            },
            base: nopad_model::quant::BaseDtype::Nf4,
            adapter: None,
        };
        let text = memory_table(&cfg, (&examples, &pack), (1, 1), 24 << 30, Some(lora));
        assert!(!text.contains("alias lora"), "{text}");
        let row = |label: &str| {
            let v = fits(&text, label, "");
            assert_eq!(v.len(), 1, "{label}: {text}");
            v[0]
        };
        let kept = row("f32/f32/none lora-r16 nf4  ");
        let off = row("f32/f32/none lora-r16 nf4 acts-offload:16");
        let mlp = row("f32/f32/mlp lora-r16 nf4  ");
        let both = row("f32/f32/mlp lora-r16 nf4 acts-offload:16");
        assert!(kept < off && off < both && both < mlp, "{text}");
    }

    #[test]
    fn several_gpus_add_the_plan_of_every_stage_per_rank() {
        let (cfg, examples, pack) = flan_8b();
        let one = memory_table(&cfg, (&examples, &pack), (1, 1), 80 << 30, None);
        assert!(!one.contains("by --shard stage"), "{one}");
        let text = memory_table(&cfg, (&examples, &pack), (1, 8), 80 << 30, None);
        assert!(
            text.contains("per rank of 8 GPUs, by --shard stage"),
            "{text}"
        );
        let rows: Vec<usize> = (0..4)
            .flat_map(|s| fits(&text, "f32/f32/none", &format!("stage {s}×8")))
            .collect();
        // The mode table's first row and the four stages' rows.
        assert_eq!(rows.len(), 5, "{text}");
        // An 8B with fp32 moments does not fit 80 GiB unsharded, but does from stage 1 on;
        // stage 3 fits the most. (Stage 2 may fit fewer tokens than stage 1: its one-group
        // gradient scratch is not placed over dead activations as aliased gradients are.)
        assert_eq!(rows[..2], [0, 0], "{text}");
        assert!(
            rows[2] > 0 && rows[3] > 0 && rows[4] > rows[2].max(rows[3]),
            "{text}"
        );
    }
}
