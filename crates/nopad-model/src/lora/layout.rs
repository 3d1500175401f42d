//! Where every adapter tensor lives in the adapter's one flat buffer, under its PEFT name, and
//! where its output lands in the base model's fused projections.
//!
//! Layer by layer, lowest first; in each layer the targets in layer order, each `A` (`[r, in]`)
//! then `B` (`[out, r]`). Every adapter matrix takes weight decay (HF Trainer decays all but
//! norms and biases), and each layer's adapters form one [`ParamGroup`] of kind
//! `GroupKind::Layer(l)`, listed from the top layer down: the order in which the backward
//! completes them, as [`crate::Layout::groups`] is ordered.

use std::ops::Range;

use super::{LoraConfig, Target};
use crate::config::Config;
use crate::layout::{GroupKind, LayerRanges, ParamGroup, TensorSpec};

/// The prefix PEFT gives every tensor of a causal LM's adapter.
pub const PEFT_PREFIX: &str = "base_model.model.model.layers.";

/// One adapter: its target, its two matrices, and where its output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// The adapted projection.
    pub target: Target,
    /// Where A (`[r, in]`, PEFT's `lora_A`) and B (`[out, r]`, `lora_B`) lie in the adapter
    /// buffer.
    pub a: Range<usize>,
    #[doc = "B's range (see `a`)."]
    pub b: Range<usize>,
    /// The projection's input features (`in`).
    pub d_in: usize,
    /// Its output features (`out`); they land in columns `c0..c0 + out` of the fused output
    /// (q, k, v in `qkv`; gate, up in `gu`; all of o's and down's), whose rows are `stride`
    /// long.
    pub d_out: usize,
    #[doc = "The first of those columns."]
    pub c0: usize,
    #[doc = "The fused output's row length."]
    pub stride: usize,
}

impl ModuleSpec {
    /// The base weight matrix (`[stride, in]`) whose rows `c0..c0 + out` this adapter adapts.
    pub fn base_weight(&self, lr: &LayerRanges) -> Range<usize> {
        match self.target {
            Target::Q | Target::K | Target::V => lr.qkv_w.clone(),
            Target::O => lr.o_w.clone(),
            Target::Gate | Target::Up => lr.gate_up_w.clone(),
            Target::Down => lr.down_w.clone(),
        }
    }
}

/// The adapter's layout.
#[derive(Clone, Debug)]
pub struct AdapterLayout {
    /// Rank r.
    pub r: usize,
    /// Per layer, its adapters in layer order.
    pub layers: Vec<Vec<ModuleSpec>>,
    /// Every tensor under its PEFT name, in buffer order.
    pub tensors: Vec<TensorSpec>,
    /// One group per layer, top layer first.
    pub groups: Vec<ParamGroup>,
    /// Elements.
    pub total: usize,
}

/// `(in, out, first column, row length of the fused output)` of `t`'s projection.
fn geometry(t: Target, c: &Config) -> (usize, usize, usize, usize) {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let (qd, kvd) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let w = c.qkv_width();
    match t {
        Target::Q => (d, qd, 0, w),
        Target::K => (d, kvd, qd, w),
        Target::V => (d, kvd, qd + kvd, w),
        Target::O => (qd, d, 0, d),
        Target::Gate => (d, f, 0, 2 * f),
        Target::Up => (d, f, f, 2 * f),
        Target::Down => (f, d, 0, d),
    }
}

/// The PEFT name of layer `l`'s adapter matrix `ab` ("A" or "B") on `t`.
pub fn peft_name(l: usize, t: Target, ab: &str) -> String {
    format!(
        "{PEFT_PREFIX}{l}.{}.{}.lora_{ab}.weight",
        t.parent(),
        t.name()
    )
}

impl AdapterLayout {
    /// The layout of `lora`'s adapters on a model of `c`.
    pub fn new(c: &Config, lora: &LoraConfig) -> AdapterLayout {
        let r = lora.r;
        let mut next = 0;
        let mut tensors = Vec::new();
        let mut take = |name: String, shape: Vec<usize>| {
            let spec = TensorSpec {
                name,
                shape,
                offset: next,
            };
            next = spec.range().end;
            let range = spec.range();
            tensors.push(spec);
            range
        };
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let mods: Vec<ModuleSpec> = lora
                .targets
                .iter()
                .map(|&t| {
                    let (d_in, d_out, c0, stride) = geometry(t, c);
                    ModuleSpec {
                        target: t,
                        a: take(peft_name(l, t, "A"), vec![r, d_in]),
                        b: take(peft_name(l, t, "B"), vec![d_out, r]),
                        d_in,
                        d_out,
                        c0,
                        stride,
                    }
                })
                .collect();
            layers.push(mods);
        }
        let groups = layers
            .iter()
            .enumerate()
            .rev()
            .map(|(l, mods)| ParamGroup {
                kind: GroupKind::Layer(l),
                decay: match (mods.first(), mods.last()) {
                    (Some(a), Some(z)) => std::iter::once(a.a.start..z.b.end).collect(),
                    _ => Vec::new(),
                },
                no_decay: vec![],
            })
            .collect();
        AdapterLayout {
            r,
            layers,
            tensors,
            groups,
            total: next,
        }
    }

    /// The largest input and output width of any adapter (for scratch sizes).
    pub(crate) fn widest(&self) -> (usize, usize) {
        let mods = self.layers.iter().flatten();
        let d_in = mods.clone().map(|m| m.d_in).max().unwrap_or(0);
        (d_in, mods.map(|m| m.d_out).max().unwrap_or(0))
    }

    /// The most adapters in one layer.
    pub(crate) fn per_layer(&self) -> usize {
        self.layers.iter().map(Vec::len).max().unwrap_or(0)
    }
}
