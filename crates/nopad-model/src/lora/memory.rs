//! What a LoRA model allocates beyond a full model's activations, as sizes: the adapters, their
//! gradients, the saved `u = drop(x)·Aᵀ` of every layer and the adapters' scratch
//! ([`adapter_parts`], which `model/lora.rs` allocates from), and the model's bytes with its
//! frozen base ([`lora_model_bytes`]) for the memory plan. [`LoraShape`] is what of the settings
//! decides them, small enough to copy around a plan.

use nopad_backend::Kind;

use super::{AdapterLayout, LoraConfig, Target};
use crate::config::Config;
use crate::layout::Layout;
use crate::memory::{self, held, Device, GradHolding, ModelBytes, Part};
use crate::quant::BaseDtype;
use crate::recompute::Recompute;

/// What of a LoRA run's settings decides its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    /// Rank r.
    pub r: usize,
    /// The targets, one bit per [`Target::ALL`] entry.
    pub targets: u8,
    /// Whether the adapters' inputs are dropped (a dropped-input scratch).
    pub dropout: bool,
    /// How the base's projections are held.
    pub base: BaseDtype,
}

impl LoraShape {
    /// The shape of `lora` over a base held as `base`.
    pub fn of(lora: &LoraConfig, base: BaseDtype) -> Self {
        let targets = Target::ALL
            .iter()
            .enumerate()
            .filter(|(_, t)| lora.targets.contains(t))
            .fold(0u8, |m, (i, _)| m | 1 << i);
        LoraShape {
            r: lora.r,
            targets,
            dropout: lora.dropout > 0.0,
            base,
        }
    }

    /// The adapters' layout on a model of `cfg`.
    pub fn layout(&self, cfg: &Config) -> AdapterLayout {
        let targets = Target::ALL
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.targets & 1 << i != 0)
            .map(|(_, t)| t)
            .collect();
        let lc = LoraConfig {
            r: self.r,
            alpha: 1.0,
            dropout: if self.dropout { 0.5 } else { 0.0 },
            targets,
            use_rslora: false,
            seed: 0,
        };
        AdapterLayout::new(cfg, &lc)
    }
}

/// The buffers a LoRA model adds for `cap` tokens, in the order it allocates them: per layer the
/// saved `u` (`[adapters, cap, r]`), then the scratch `du` (`[cap, r]`) and `xd`
/// (`[cap, widest in]` with dropout, else empty).
pub fn adapter_parts(layout: &AdapterLayout, cap: usize, dropout: bool) -> Vec<Part> {
    let (r, per, widest) = (layout.r, layout.per_layer(), layout.widest());
    let mut v: Vec<Part> = layout
        .layers
        .iter()
        .map(|_| (per * cap * r, Kind::Compute))
        .collect();
    v.extend([
        (cap * r, Kind::Compute),
        (if dropout { cap * widest.0 } else { 0 }, Kind::Compute),
    ]);
    v
}

/// A training LoRA model's bytes with `tokens` in its largest micro-batch: the frozen base's
/// weights, the adapters (in `weights`), their gradients (gradients over dead activations are
/// off in LoRA runs), and the activations with the adapters' saved `u` and scratch.
pub fn lora_model_bytes(
    cfg: &Config,
    shape: &LoraShape,
    tokens: usize,
    acts: (Recompute, usize),
    dev: &Device<'_>,
) -> ModelBytes {
    let one = |(len, kind): Part| held(len * (dev.size)(kind), &dev.acc);
    let layout = Layout::new(cfg);
    let base = memory::model_bytes(cfg, &layout, tokens, acts, GradHolding::Separate, dev);
    let base_weights = match shape.base {
        BaseDtype::Bf16 => base.weights,
        BaseDtype::Nf4 => {
            base.weights - one((layout.total, Kind::Compute)) + nf4_base_bytes(cfg, dev)
        }
    };
    let ad = shape.layout(cfg);
    let extra: usize = adapter_parts(&ad, tokens, shape.dropout)
        .into_iter()
        .map(one)
        .sum();
    ModelBytes {
        weights: base_weights + one((ad.total, Kind::Compute)),
        grads: one((ad.total, Kind::Grad)),
        activations: base.activations + extra,
    }
}

/// The HF modules' weight matrices of one layer, as `(rows, cols)`: q, k, v, o, gate, up, down
/// (each is quantised on its own, as bitsandbytes quantises each `Linear`).
pub fn projection_shapes(cfg: &Config) -> [(usize, usize); 7] {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    [(qd, d), (kvd, d), (kvd, d), (d, qd), (f, d), (f, d), (d, f)]
}

/// An NF4 base's bytes: the parameters outside the projection matrices in the Compute type
/// (embedding, head, norms, biases), each projection matrix as its NF4 parts (packed codes and
/// scale codes Code8, the double quantisation's absmaxes and mean Master; see
/// `nopad_backend::nf4::nf4_lens`), and one Compute scratch the size of the largest fused
/// matrix (q/k/v, o, gate/up, down), into which each is dequantised just ahead of its GEMM.
pub fn nf4_base_bytes(cfg: &Config, dev: &Device<'_>) -> usize {
    let one = |(len, kind): Part| held(len * (dev.size)(kind), &dev.acc);
    let shapes = projection_shapes(cfg);
    let per_layer: usize = shapes.iter().map(|&(r, c)| r * c).sum();
    let rest = Layout::new(cfg).total - cfg.num_hidden_layers * per_layer;
    let quantised: usize = shapes
        .iter()
        .map(|&(r, c)| {
            let (nc, nb, na) = nopad_backend::nf4::nf4_lens(r * c);
            one((nc, Kind::Code8)) + one((nb, Kind::Code8)) + one((na, Kind::Master))
        })
        .sum();
    let [q, k, v, o, g, u, dn] = shapes.map(|(r, c)| r * c);
    let scratch = (q + k + v).max(o).max(g + u).max(dn);
    one((rest, Kind::Compute)) + cfg.num_hidden_layers * quantised + one((scratch, Kind::Compute))
}
