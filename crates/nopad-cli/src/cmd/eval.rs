//! `nopad eval`: the token-weighted loss of a model over a data file, independent of the
//! strategy and batch size used to compute it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nopad_backend::Backend;
use nopad_data::{PackOptions, Strategy};
use nopad_train::{
    build_adapter_eval_model, build_eval_model, evaluate, pad_token_id, ModelSource,
};

use crate::device::{run_on, DeviceChoice, Job, Precision};

/// Flags of `nopad eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// HF model directory or preset name.
    #[arg(long)]
    pub model: String,
    /// Data file (pretokenized JSONL with `input_ids` and optional `labels`, or any format
    /// `nopad train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Packing strategy used to batch the examples (the loss does not depend on it).
    #[arg(long, default_value = "flatten")]
    pub strategy: Strategy,
    /// Examples per batch (the loss does not depend on it).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Longest example in tokens; longer ones follow --long (and are counted on stderr).
    #[arg(long, default_value_t = 32768)]
    pub max_len: usize,
    #[command(flatten)]
    pub loader: super::LoaderArgs,
    /// Tokens whose loss counts: assistant, completion or all (default: the format's own).
    #[arg(long, value_name = "WHICH")]
    pub loss_on: Option<nopad_data::LossOn>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Compute type on CUDA: bf16 (mixed precision) or f32.
    #[arg(long, default_value = "bf16", value_parser = crate::device::parse_dtype)]
    pub dtype: nopad_backend::cuda::CudaDtype,
    /// A PEFT LoRA adapter directory to evaluate on top of --model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// How the base's projection matrices are held under --adapter: bf16 or nf4 (QLoRA; as
    /// the adapter was trained).
    #[arg(long = "base-dtype", value_name = "bf16|nf4", default_value = "bf16", value_parser = super::lora::parse_base)]
    pub base_dtype: nopad_model::quant::BaseDtype,
    /// Print `{"loss": ..., "tokens": ...}` only.
    #[arg(long)]
    pub json: bool,
}

struct EvalJob<'a>(&'a EvalArgs);

impl Job for EvalJob<'_> {
    type Out = nopad_train::EvalResult;
    fn run<B: Backend>(self, b: &B) -> Result<Self::Out> {
        let a = self.0;
        let source = super::model_source(&a.model)?;
        if a.adapter.is_none() && a.base_dtype != nopad_model::quant::BaseDtype::Bf16 {
            anyhow::bail!("--base-dtype applies to the base under --adapter");
        }
        let (mut model, _) = match &a.adapter {
            Some(dir) => build_adapter_eval_model(b, &source, 0, dir, a.base_dtype)?,
            None => build_eval_model(b, &source, 0)?,
        };
        let mut opts = a.loader.options(a.max_len);
        opts.vocab_size = Some(model.cfg.vocab_size);
        opts.loss_on = a.loss_on;
        if let ModelSource::Dir(d) = &source {
            opts.tokenizer_dir = Some(d.clone());
        }
        let (examples, report) = nopad_data::load_examples(&a.data, &opts)?;
        if !a.json || report.truncated + report.skipped + report.dropped + report.no_targets > 0 {
            eprintln!("nopad: {}: {report}", a.data.display());
        }
        let pack = PackOptions {
            strategy: a.strategy,
            batch_size: a.batch_size,
            max_len: a.max_len,
            pad_token_id: pad_token_id(&model.cfg),
            group_by_length: false,
        };
        Ok(evaluate(b, &mut model, &examples, &pack)?)
    }
}

/// Runs `nopad eval`.
pub fn run(a: &EvalArgs) -> Result<()> {
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let r = run_on(a.device, Precision::of(a.dtype), EvalJob(a))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": r.loss, "tokens": r.tokens})
        );
    } else {
        println!("loss {:.6} over {} target tokens", r.loss, r.tokens);
    }
    Ok(())
}
