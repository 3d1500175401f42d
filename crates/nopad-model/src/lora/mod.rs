//! LoRA: low-rank adapters on a frozen base model, in the manner of PEFT.
//!
//! Each targeted projection `W` of each layer gets `y += s · drop(x)·Aᵀ·Bᵀ` with `A: [r, in]`,
//! `B: [out, r]` and `s = alpha / r` (`alpha / √r` with rsLoRA). The base weights are frozen:
//! the model computes only input gradients through them. This module owns the settings
//! ([`LoraConfig`]), where every adapter tensor lives in the adapter's one flat buffer and under
//! which PEFT name ([`layout`]), PEFT's initialisation ([`init_adapter`]), the adapter's forward
//! and backward on a backend (`apply`), PEFT's files in and out and the merge into the base
//! weights ([`peft`]), what a LoRA model allocates ([`memory`]), and a frozen base held in NF4
//! (QLoRA; `nf4`).

pub(crate) mod apply;
mod init;
pub mod layout;
pub mod memory;
mod merge;
pub(crate) mod nf4;
pub mod peft;

pub(crate) use apply::{LayerPass, LoraScratch};
pub use init::init_adapter;
pub use layout::{AdapterLayout, ModuleSpec};
pub use merge::merge;
pub use peft::{load_adapter, read_adapter_config, save_adapter};

use crate::error::{ModelError, Result};

/// A projection an adapter can target, by its HF module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Target {
    /// Every target, in layer order (what `all-linear` means for a Llama decoder).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The HF module name, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The HF parent module, `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// The target of an HF module name.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Parses `all-linear` or a comma-separated list of module names, into layer order without
    /// repeats. `what` names the source in errors (a flag, a file).
    pub fn parse_list(s: &str, what: &str) -> Result<Vec<Target>> {
        if s.trim() == "all-linear" {
            return Ok(Target::ALL.to_vec());
        }
        let mut v = Vec::new();
        for name in s.split(',').map(str::trim) {
            let t = Target::from_name(name).ok_or_else(|| {
                ModelError::Input(format!(
                    "{what}: unknown LoRA target {name:?}; expected all-linear or a list of {}",
                    Target::ALL.map(Target::name).join(", ")
                ))
            })?;
            v.push(t);
        }
        v.sort();
        v.dedup();
        Ok(v)
    }
}

/// The settings of a LoRA run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on each adapter's input (0 = none).
    pub dropout: f32,
    /// The adapted projections, in layer order.
    pub targets: Vec<Target>,
    /// rsLoRA: scale `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Seed of A's initialisation and of the dropout masks.
    pub seed: u64,
}

impl LoraConfig {
    /// The adapter output's scale, as PEFT computes it.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }) as f32
    }

    /// Checks the settings; `what` names their source in errors.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(format!("{what}: {m}")));
        if self.r == 0 {
            return bad("the LoRA rank r must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_alpha must be positive, not {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora_dropout must lie in [0, 1), not {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad("no LoRA target modules".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_nf4;
#[cfg(test)]
mod tests_peft;
