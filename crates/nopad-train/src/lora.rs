//! LoRA runs: the settings a run trains adapters with ([`LoraTrain`]), the LoRA model built over
//! a frozen base (a fresh adapter as PEFT initialises one, or a PEFT adapter to continue from),
//! and the adapter's files where a full run writes weights: PEFT's `adapter_model.safetensors`
//! and `adapter_config.json` in the output directory and in checkpoints (whose optimizer state
//! then covers the adapters only).

use std::path::{Path, PathBuf};

use nopad_backend::Backend;
use nopad_model::lora::{self, LoraConfig};
use nopad_model::quant::BaseDtype;
use nopad_model::weights::SaveDtype;
use nopad_model::Model;

use crate::config::ModelSource;
use crate::error::{Result, TrainError};
use crate::optimizer::Optimizer;
use crate::session::build;

/// What a LoRA run trains.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTrain {
    /// Rank, alpha, dropout, targets, rsLoRA; `seed` is the run's.
    pub settings: LoraConfig,
    /// A PEFT adapter directory to start from instead of a fresh adapter.
    pub adapter: Option<PathBuf>,
    /// How the frozen base's projections are held (`--base-dtype`).
    pub base: BaseDtype,
}

/// What PEFT records as the base model: the directory, or the preset's name.
fn base_name(source: &ModelSource) -> String {
    match source {
        ModelSource::Preset(name) => name.clone(),
        ModelSource::Dir(d) => d.display().to_string(),
    }
}

/// Checks that the adapter in `dir` has the shape `want` asks for (rank and targets), so its
/// tensors fit; scale and dropout are the run's.
fn check_adapter_shape(dir: &Path, want: &LoraConfig) -> Result<()> {
    let (saved, _) = lora::read_adapter_config(dir)?;
    if saved.r != want.r || saved.targets != want.targets {
        let names = |c: &LoraConfig| {
            let t: Vec<&str> = c.targets.iter().map(|t| t.name()).collect();
            format!("r {} on {}", c.r, t.join(","))
        };
        return Err(TrainError::Config(format!(
            "--adapter {}: the adapter is {}, this run asks for {} (--lora-r, --lora-targets)",
            dir.display(),
            names(&saved),
            names(want)
        )));
    }
    Ok(())
}

/// A LoRA model for training: the base from `source` (frozen; a preset's first `layers` decoder
/// layers if given), the adapter fresh (seeded by the run's seed) or from `lt.adapter`.
pub fn build_lora_model<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
    layers: Option<usize>,
    lt: &LoraTrain,
) -> Result<(Model<B>, String)> {
    let (settings, base) = (lt.settings.clone(), lt.base);
    let (mut m, desc) = build(b, source, seed, layers, |b, cfg| {
        Model::new_lora_over(b, cfg, settings, base, true)
    })?;
    let layout = m.adapter_layout().expect("a LoRA model").clone();
    match &lt.adapter {
        Some(dir) => {
            check_adapter_shape(dir, &lt.settings)?;
            lora::load_adapter(dir, &layout, |off, v| m.write_adapter(b, off, v))?;
        }
        None => lora::init_adapter(&layout, seed, |off, v| m.write_adapter(b, off, v))?,
    }
    Ok((m, desc))
}

/// A base model from `source` (its projections held as `base`) with the PEFT adapter of `dir`,
/// for evaluation.
pub fn build_adapter_eval_model<B: Backend>(
    b: &B,
    source: &ModelSource,
    seed: u64,
    dir: &Path,
    base: BaseDtype,
) -> Result<(Model<B>, String)> {
    let (settings, _) = lora::read_adapter_config(dir)?;
    let (mut m, desc) = build(b, source, seed, None, |b, cfg| {
        Model::new_lora_over(b, cfg, settings, base, false)
    })?;
    let layout = m.adapter_layout().expect("a LoRA model").clone();
    lora::load_adapter(dir, &layout, |off, v| m.write_adapter(b, off, v))?;
    Ok((m, format!("{desc} + adapter {}", dir.display())))
}

/// Writes the adapter (its fp32 master weights where the optimizer keeps them) in PEFT's format.
pub(crate) fn save_adapter<B: Backend>(
    b: &B,
    dir: &Path,
    model: &Model<B>,
    opt: &Optimizer<B>,
    dtype: SaveDtype,
    source: &ModelSource,
) -> Result<()> {
    let (Some(settings), Some(layout)) = (model.lora(), model.adapter_layout()) else {
        return Err(TrainError::Config("not a LoRA model".into()));
    };
    let vals = opt.read_weights(b, model, 0..layout.total)?;
    lora::save_adapter(dir, settings, layout, dtype, &base_name(source), &vals)?;
    Ok(())
}

/// Restores the adapter (and the optimizer's master copy of it) from a checkpoint directory.
pub(crate) fn restore_adapter<B: Backend>(
    b: &B,
    dir: &Path,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
) -> Result<()> {
    let layout = model.adapter_layout().expect("a LoRA model").clone();
    let params = model.trainable_mut();
    // The optimizer knows where the master weights live (device, host or none).
    lora::load_adapter(dir, &layout, |off, vals| {
        Ok(opt.write_weights(b, params, off, vals)?)
    })?;
    Ok(())
}

/// A line for the summary: what trains.
pub(crate) fn describe<B: Backend>(model: &Model<B>) -> Option<String> {
    let s = model.lora()?;
    let targets: Vec<&str> = s.targets.iter().map(|t| t.name()).collect();
    let (n, total) = (model.trainable_len(), model.layout.total);
    Some(format!(
        "LoRA r {} alpha {} (scale {}{}) dropout {} on {}: {n} trainable parameters ({:.3}% of the frozen base's {total})",
        s.r,
        s.alpha,
        s.scale(),
        if s.use_rslora { ", rsLoRA" } else { "" },
        s.dropout,
        targets.join(","),
        100.0 * n as f64 / total as f64,
    ) + match model.base_dtype() {
        BaseDtype::Nf4 => ", base in NF4",
        BaseDtype::Bf16 => "",
    })
}
