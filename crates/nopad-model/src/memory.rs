//! What the model allocates, as sizes: the buffers of its parameters, gradients and activations
//! for a micro-batch of N tokens, and their bytes on a device described by its element sizes
//! and [`Accounting`]. `model/acts.rs` allocates from [`act_parts`] and the arena's placement
//! from [`slot_bytes`] and [`grad_limits`], so the prediction and the allocation cannot drift.
//! The optimizer's share and the whole plan are nopad-train's (`plan.rs`).

use std::ops::Range;

use nopad_backend::{Accounting, Kind};

use crate::arena::{self, align_up};
use crate::config::Config;
use crate::layout::Layout;
use crate::recompute::{gu_homes, GuHome, Recompute};

/// One buffer: elements and kind.
pub type Part = (usize, Kind);

/// The activation buffers of a micro-batch, in the order `model/acts.rs` allocates them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActParts {
    /// One slot per layer: its input residual stream `[N, D]`, then (unless one shared set
    /// serves every layer) what its backward reads, in `LayerActs` field order.
    pub slots: Vec<Vec<Part>>,
    /// Under full recomputation, the one set of `LayerActs` every layer rebuilds (empty else).
    pub shared_layer: Vec<Part>,
    /// The rest, each on its own: the last residual stream, the final norm's output and
    /// reciprocal RMS, then the `Scratch` buffers (h, a, rstd_tmp, d_res, d_h, d_qkv, d_att,
    /// d_a, gu), then the two device buffers offloaded layers take turns in.
    pub tail: Vec<Part>,
}

impl ActParts {
    /// Every part, in allocation order.
    pub fn all(&self) -> impl Iterator<Item = &Part> {
        self.slots
            .iter()
            .flatten()
            .chain(&self.shared_layer)
            .chain(&self.tail)
    }
}

/// The activation buffers for `cap` tokens under recomputation `mode` with `offload` layers'
/// gate/up projections offloaded ([`gu_homes`]; a count it refuses counts as none here: it is
/// refused where it is set).
pub fn act_parts(cfg: &Config, cap: usize, mode: Recompute, offload: usize) -> ActParts {
    let full = mode == Recompute::Full;
    let n_layers = cfg.num_hidden_layers;
    let homes = gu_homes(n_layers, mode, offload)
        .or_else(|_| gu_homes(n_layers, mode, 0))
        .unwrap_or_default();
    let home = |l: usize| homes.get(l).copied().unwrap_or(GuHome::Kept);
    let offloaded = homes.iter().filter(|&&h| h == GuHome::Offloaded).count();
    let recomputed = homes.contains(&GuHome::Recomputed);
    let (d, f, h) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let (w, hd, n_layers) = (cfg.qkv_width(), h * cfg.head_dim, cfg.num_hidden_layers);
    let (big, stat) = (Kind::Compute, Kind::Master);
    let gu_len = |on: bool| if on { 2 * f } else { 0 };
    // What one layer saves, in `LayerActs` field order; with q/k norms, the heads' inputs and
    // reciprocal RMS last (`QkNormActs`).
    let normed = (h + cfg.num_key_value_heads) * cap;
    let layer_parts = |l: usize| {
        let mut v = vec![
            (cap, stat),
            (cap * w, big),
            (cap * hd, big),
            (cap * h, stat),
            (cap * d, big),
            (cap, stat),
            (cap * gu_len(home(l) == GuHome::Kept), big),
        ];
        if cfg.qk_norm {
            v.extend([(normed * cfg.head_dim, big), (normed, stat)]);
        }
        v
    };
    let slots = (0..n_layers)
        .map(|l| {
            let mut v = vec![(cap * d, big)];
            if !full {
                v.extend(layer_parts(l));
            }
            v
        })
        .collect();
    ActParts {
        slots,
        shared_layer: if full { layer_parts(0) } else { Vec::new() },
        tail: vec![
            (cap * d, big),
            (cap * d, big),
            (cap, stat),
            (cap * d, big),
            (cap * f, big),
            (cap, stat),
            (cap * d, big),
            (cap * d, big),
            (cap * w, big),
            (cap * hd, big),
            (cap * f, big),
            (cap * gu_len(recomputed), big),
            // The offloaded layers' turns (`model::offload`).
            (cap * gu_len(offloaded > 0), big),
            (cap * gu_len(offloaded > 1), big),
        ],
    }
}

/// Each part's byte offset inside its slot, and each slot's bytes (parts aligned as
/// [`nopad_backend::Device::alloc_parts`] asks).
pub fn slot_bytes(
    slots: &[Vec<Part>],
    size: impl Fn(Kind) -> usize,
) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut rel = Vec::with_capacity(slots.len());
    let mut sizes = Vec::with_capacity(slots.len());
    for parts in slots {
        let mut at = 0;
        let mut offs = Vec::with_capacity(parts.len());
        for &(len, kind) in parts {
            offs.push(at);
            at += align_up(len * size(kind));
        }
        rel.push(offs);
        sizes.push(at);
    }
    (rel, sizes)
}

/// Element ranges of the gradients written while layer `l`'s activations are still to be read:
/// those of layers `l..`, the output head (written in the forward) and the final norm. An
/// untied embedding's is written after every layer's backward.
pub fn grads_written_above(layout: &Layout, l: usize) -> Vec<Range<usize>> {
    let mut v = vec![layout.lm_head.clone(), layout.norm.clone()];
    for lr in &layout.layers[l..] {
        v.extend([
            lr.qkv_w.clone(),
            lr.o_w.clone(),
            lr.gate_up_w.clone(),
            lr.down_w.clone(),
        ]);
        v.extend(lr.vectors().cloned());
    }
    v
}

/// For each slot, the first gradient byte written while it is live (`grad` bytes a gradient):
/// the limit [`crate::arena`] places it under.
pub fn grad_limits(layout: &Layout, grad: usize) -> Vec<usize> {
    (0..layout.layers.len())
        .map(|l| {
            grads_written_above(layout, l)
                .iter()
                .map(|r| r.start * grad)
                .min()
                .unwrap_or(usize::MAX / 4)
        })
        .collect()
}

/// Bytes one allocation of `bytes` counts under `acc` (see [`Accounting::round`]).
pub fn held(bytes: usize, acc: &Accounting) -> usize {
    if acc.round <= 1 {
        bytes
    } else {
        bytes.max(1).div_ceil(acc.round) * acc.round
    }
}

/// Elements of the gathered weights a model sharded by weight keeps besides its pieces
/// ([`crate::Model::new_sharded`], Compute): two layers, the embedding, the untied head and the
/// final norm, each range aligned to 64 elements. Its pieces are its part of every range.
pub fn gathered_weights_len(layout: &Layout) -> usize {
    crate::model::gathered_weights_len(layout)
}

/// How the model's gradients are held during a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradHolding {
    /// A `[P]` buffer of their own.
    Separate,
    /// Over dead activations in one allocation with them ([`crate::Model::set_grad_aliasing`]).
    Aliased,
    /// Only a scratch for the groups in flight, each group's update run as its gradient is
    /// complete (optimizer in the backward): the embedding's gradient plus the largest other
    /// group's.
    GroupScratch,
}

/// The model's bytes for one micro-batch, by what they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelBytes {
    /// The parameters as the forward reads them, plus the RoPE table and the loss accumulator.
    pub weights: usize,
    /// The parameter gradients (with aliasing: what the shared allocation holds beyond the
    /// activations' slots).
    pub grads: usize,
    /// The saved activations and the layers' scratch.
    pub activations: usize,
}

/// Element sizes of a device's buffer kinds with its accounting: what the model's bytes depend on.
pub struct Device<'a> {
    /// Bytes of one element of a kind (`Device::kind_size`).
    pub size: &'a dyn Fn(Kind) -> usize,
    /// How buffers count.
    pub acc: Accounting,
}

/// The model's bytes with `tokens` in its largest micro-batch, under recomputation `mode` with
/// `offload` layers' gate/up projections offloaded.
pub fn model_bytes(
    cfg: &Config,
    layout: &Layout,
    tokens: usize,
    (mode, offload): (Recompute, usize),
    grads: GradHolding,
    dev: &Device<'_>,
) -> ModelBytes {
    let size = dev.size;
    let one = |(len, kind): Part| held(len * size(kind), &dev.acc);
    let p = layout.total;
    let rope = crate::rope::inv_freq(cfg).len();
    let weights = one((p, Kind::Compute)) + one((rope, Kind::Master)) + one((1, Kind::Master));
    let parts = act_parts(cfg, tokens, mode, offload);
    let g = size(Kind::Grad);
    let separate: usize = parts.all().map(|&x| one(x)).sum();
    match grads {
        GradHolding::Separate => ModelBytes {
            weights,
            grads: one((p, Kind::Grad)),
            activations: separate,
        },
        GradHolding::GroupScratch => ModelBytes {
            weights,
            grads: one((crate::model::group_scratch_len(layout), Kind::Grad)),
            activations: separate,
        },
        // The backend allocates each part on its own: the gradients are one more buffer.
        GradHolding::Aliased if !dev.acc.shares_parts => ModelBytes {
            weights,
            grads: one((p, Kind::Grad)),
            activations: separate,
        },
        GradHolding::Aliased => {
            let (_, sizes) = slot_bytes(&parts.slots, size);
            let place = arena::place(&sizes, &grad_limits(layout, g), p * g);
            let arena_bytes = held(place.bytes.div_ceil(2) * 2, &dev.acc);
            let slots: usize = sizes.iter().sum();
            let rest: usize = parts
                .shared_layer
                .iter()
                .chain(&parts.tail)
                .map(|&x| one(x))
                .sum();
            ModelBytes {
                weights,
                grads: arena_bytes.saturating_sub(slots),
                activations: slots.min(arena_bytes) + rest,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GroupKind;

    /// The gathered weights hold two layers and the groups outside the layers, each range
    /// rounded up by less than 64 elements: far less than the model once it has a few layers.
    #[test]
    fn gathered_weights_are_two_layers_and_the_ends() {
        let tiny = Config::preset("tiny").unwrap();
        let six_layers = |tie_word_embeddings| Config {
            tie_word_embeddings,
            num_hidden_layers: 6,
            ..tiny.clone()
        };
        for layout in [false, true].map(six_layers).iter().map(Layout::new) {
            let kinds = [
                GroupKind::Layer(0),
                GroupKind::Layer(0),
                GroupKind::Embedding,
                GroupKind::Head,
                GroupKind::FinalNorm,
            ];
            let groups: Vec<_> = kinds.iter().filter_map(|&k| layout.group(k)).collect();
            let exact: usize = groups.iter().map(|g| g.len()).sum();
            let ranges: usize = groups.iter().map(|g| g.ranges().count()).sum();
            let got = gathered_weights_len(&layout);
            assert!(got >= exact && got < exact + 64 * ranges, "{got} {exact}");
            assert!(got < layout.total, "{got} of {}", layout.total);
        }
    }
}
