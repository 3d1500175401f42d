//! The LoRA flags `nopad train` and `nopad bench` share, and what they resolve to.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use nopad_model::lora::{read_adapter_config, LoraConfig, Target};
use nopad_model::quant::BaseDtype;
use nopad_train::LoraTrain;

/// LoRA flags (command line only, not config-file keys).
#[derive(Args, Clone, Debug, Default)]
pub struct LoraArgs {
    /// Train LoRA adapters of rank R on a frozen base instead of every weight. The output
    /// directory then holds PEFT's adapter_model.safetensors and adapter_config.json.
    #[arg(long = "lora-r", value_name = "R")]
    pub lora_r: Option<usize>,
    /// The adapters' output is scaled by A / R (A / √R with --use-rslora). Default: 2·R (PEFT's
    /// own default is 8).
    #[arg(long = "lora-alpha", value_name = "A")]
    pub lora_alpha: Option<f64>,
    /// Dropout on each adapter's input while training. Default: 0.
    #[arg(long = "lora-dropout", value_name = "P")]
    pub lora_dropout: Option<f32>,
    /// The adapted projections: all-linear (the default: q, k, v, o, gate, up and down) or a
    /// comma-separated list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    #[arg(long = "lora-targets", value_name = "all-linear|LIST")]
    pub lora_targets: Option<String>,
    /// rsLoRA: scale by alpha / √r instead of alpha / r.
    #[arg(long = "use-rslora")]
    pub use_rslora: bool,
    /// Start from this PEFT adapter directory instead of a fresh adapter; its r, alpha,
    /// dropout, targets and rsLoRA setting are the defaults of the flags above.
    #[arg(long = "adapter", value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// How the frozen base's projection matrices are held: bf16 (the default) or nf4 (QLoRA:
    /// 4-bit NormalFloat, blocks of 64, double-quantised scales).
    #[arg(long = "base-dtype", value_name = "bf16|nf4", default_value = "bf16", value_parser = parse_base)]
    pub base_dtype: BaseDtype,
}

pub(crate) fn parse_base(s: &str) -> std::result::Result<BaseDtype, String> {
    BaseDtype::parse(s, "--base-dtype").map_err(|e| e.to_string())
}

impl LoraArgs {
    /// The LoRA settings these flags ask for (None: full fine-tuning); `seed` is the run's.
    pub fn resolve(&self, seed: u64) -> Result<Option<LoraTrain>> {
        let from = match &self.adapter {
            Some(dir) => Some(read_adapter_config(dir)?.0),
            None => None,
        };
        let Some(r) = self.lora_r.or(from.as_ref().map(|c| c.r)) else {
            let extra = self.lora_alpha.is_some()
                || self.lora_dropout.is_some()
                || self.lora_targets.is_some()
                || self.use_rslora
                || self.base_dtype != BaseDtype::Bf16;
            if extra {
                bail!("--lora-alpha, --lora-dropout, --lora-targets, --use-rslora and --base-dtype need --lora-r (or --adapter)");
            }
            return Ok(None);
        };
        let targets = match (&self.lora_targets, &from) {
            (Some(t), _) => Target::parse_list(t, "--lora-targets")?,
            (None, Some(c)) => c.targets.clone(),
            (None, None) => Target::ALL.to_vec(),
        };
        let settings = LoraConfig {
            r,
            alpha: self
                .lora_alpha
                .or(from.as_ref().map(|c| c.alpha))
                .unwrap_or(2.0 * r as f64),
            dropout: self
                .lora_dropout
                .or(from.as_ref().map(|c| c.dropout))
                .unwrap_or(0.0),
            targets,
            use_rslora: self.use_rslora || from.as_ref().is_some_and(|c| c.use_rslora),
            seed,
        };
        settings.validate("LoRA flags")?;
        Ok(Some(LoraTrain {
            settings,
            adapter: self.adapter.clone(),
            base: self.base_dtype,
        }))
    }
}
