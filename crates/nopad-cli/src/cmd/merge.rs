//! `nopad merge`: a base model plus a PEFT LoRA adapter written as one HF checkpoint
//! (`W + scale·B·A` in every adapted matrix), on the host, without a device.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use nopad_model::lora::{load_adapter, merge, read_adapter_config, AdapterLayout};
use nopad_model::quant::{as_base, BaseDtype};
use nopad_model::weights::{self, SaveDtype};
use nopad_model::{Config, Layout};

/// Flags of `nopad merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model: an HF directory, or a preset (random init from --seed, as training it
    /// with the same seed made it).
    #[arg(long)]
    pub model: String,
    /// The PEFT adapter directory (adapter_model.safetensors, adapter_config.json).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged model (config.json, safetensors, the base's tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of a preset base's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Element type of the merged weights: f32 or bf16.
    #[arg(long, default_value = "bf16")]
    pub save_dtype: SaveDtype,
    /// The base the adapter was trained over: bf16, or nf4 (QLoRA: the adapters are merged
    /// into the dequantised projections, as PEFT merges into a 4-bit base).
    #[arg(long = "base-dtype", value_name = "bf16|nf4", default_value = "bf16", value_parser = super::lora::parse_base)]
    pub base_dtype: BaseDtype,
}

/// Runs `nopad merge`. The base is held on the host in f32 (4 bytes per parameter).
pub fn run(a: &MergeArgs) -> Result<()> {
    let dir = match super::model_source(&a.model)? {
        nopad_train::ModelSource::Dir(d) => Some(d),
        nopad_train::ModelSource::Preset(_) => None,
    };
    let cfg = match &dir {
        Some(d) => weights::read_config(d)?,
        None => Config::preset(&a.model).with_context(|| {
            format!("--model: `{}` is neither a directory nor a preset", a.model)
        })?,
    };
    let layout = Layout::new(&cfg);
    let mut base = vec![0f32; layout.total];
    let mut sink = |off: usize, v: &[f32]| {
        base[off..off + v.len()].copy_from_slice(&as_base(a.base_dtype, &layout, off, v));
        Ok(())
    };
    match &dir {
        Some(d) => weights::load_checkpoint(d, &cfg, &layout, &mut sink)?,
        None => weights::init_random(&cfg, &layout, a.seed, &mut sink)?,
    }
    let (lora, _) = read_adapter_config(&a.adapter)?;
    let alayout = AdapterLayout::new(&cfg, &lora);
    let mut vals = vec![0f32; alayout.total];
    load_adapter(&a.adapter, &alayout, |off, v| {
        vals[off..off + v.len()].copy_from_slice(v);
        Ok(())
    })?;
    merge(&layout, &lora, &alayout, &vals, &mut base);
    weights::save_checkpoint(&a.out, &cfg, &layout, a.save_dtype, 4 << 30, |r| {
        Ok(base[r].to_vec())
    })?;
    if let Some(d) = &dir {
        weights::copy_tokenizer_files(d, &a.out)?;
    }
    eprintln!(
        "nopad: merged {} (r {}, scale {}) into {}: {}",
        a.adapter.display(),
        lora.r,
        lora.scale(),
        a.model,
        a.out.display()
    );
    Ok(())
}
