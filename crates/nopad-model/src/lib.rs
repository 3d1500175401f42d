//! nopad-model: the Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 dense).
//!
//! - [`Config`]: read from an HF `config.json` or a built-in preset, validated once.
//! - [`Layout`]: where every HF tensor lives in one flat parameter buffer.
//! - [`weights`]: random init and HF safetensors checkpoints, in and out.
//! - [`Model`]: explicit forward and backward against any [`nopad_backend::Backend`].
//! - [`generate`]: generation with a KV cache ([`Model::generate`]) and its sampling.

#![deny(missing_docs)]

mod arena;
pub mod config;
mod error;
pub mod generate;
pub mod hub;
mod layer;
pub mod layout;
pub mod lora;
pub mod memory;
mod model;
pub mod profile;
pub mod quant;
mod recompute;
pub mod rope;
pub mod weights;

pub use config::{Arch, Config, RopeScaling, PRESETS};
pub use error::{ModelError, Result};
pub use layer::{LayerActs, QkNormActs, Scratch};
pub use layout::{GroupKind, Layout, ParamGroup, TensorSpec};
pub use model::{Acts, GroupGrads, Inputs, Model, Phase, Piece, Placed, Resident, WeightSource};
pub use recompute::Recompute;

#[cfg(test)]
mod tests;
