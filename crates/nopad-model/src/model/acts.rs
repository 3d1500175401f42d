//! The model's activation buffers: sized for the largest batch so far and, with gradient
//! aliasing, placed in one allocation with the parameter gradients ([`crate::arena`]).

use std::ops::Range;

use nopad_backend::{Backend, Kind};

use super::{GradState, Model};
use crate::arena::{self, align_up};
use crate::error::{ModelError, Result};
use crate::layer::{LayerActs, Scratch};
use crate::recompute::Recompute;

/// All activation buffers, sized for `cap` tokens.
pub struct Acts<B: Backend> {
    /// Token capacity.
    pub cap: usize,
    /// `L + 1` residual streams `[N, D]`: the embedding output, then each layer's output.
    pub res: Vec<B::Buf>,
    /// Per layer.
    pub layers: Vec<LayerActs<B>>,
    /// `[N, D]` final norm output.
    pub hf: B::Buf,
    /// `[N]` its reciprocal RMS.
    pub rstdf: B::Buf,
    /// Buffers the layers share.
    pub s: Scratch<B>,
}

impl<B: Backend> Model<B> {
    /// Makes the activation buffers hold `n` tokens, reallocating them (and, with aliasing, the
    /// gradients that share their allocation) when the batch is larger than any before.
    pub(super) fn ensure_acts(&mut self, b: &B, n: usize) -> Result<()> {
        let full = self.recompute == Recompute::Full;
        let slots = if full { 1 } else { self.cfg.num_hidden_layers };
        if self
            .acts
            .as_ref()
            .is_some_and(|a| a.cap >= n && a.layers.len() == slots)
        {
            return Ok(());
        }
        if self.alias_grads && self.grad_state != GradState::Zero {
            return Err(ModelError::Input(
                "bug: aliased activations reallocated while gradients are live".into(),
            ));
        }
        // Exactly the tokens of the largest batch so far: the peak then counts no slack (a
        // backend with a caching allocator makes the reallocation cheap). The old buffers go
        // first, so that their memory can serve the new ones.
        let cap = n;
        let grow = self.acts.is_some();
        self.acts = None;
        if self.alias_grads {
            self.grads = b.alloc(0, Kind::Grad)?;
        }
        if grow {
            // No larger request can reuse the smaller blocks just freed: give them back rather
            // than keep them reserved (a few times per run, as the largest batch grows).
            b.release_cached()?;
        }
        let c = &self.cfg;
        let (d, f, h) = (c.hidden_size, c.intermediate_size, c.num_attention_heads);
        let (w, hd, n_layers) = (c.qkv_width(), h * c.head_dim, c.num_hidden_layers);
        let (big, stat) = (Kind::Compute, Kind::Master);
        let mode = self.recompute;
        let gu_len = |on: bool| if on { 2 * f } else { 0 };
        // What one layer saves, in `LayerActs` field order.
        let layer_parts = |l: usize| {
            [
                (cap, stat),
                (cap * w, big),
                (cap * hd, big),
                (cap * h, stat),
                (cap * d, big),
                (cap, stat),
                (cap * gu_len(!mode.mlp_in_layer(l)), big),
            ]
        };
        // Slot l: res[l], then (unless one shared set serves every layer) the layer's parts.
        let slot_parts: Vec<Vec<(usize, Kind)>> = (0..n_layers)
            .map(|l| {
                let mut v = vec![(cap * d, big)];
                if !full {
                    v.extend(layer_parts(l));
                }
                v
            })
            .collect();
        let mut bufs = self.alloc_slots(b, &slot_parts)?.into_iter();
        let mut res = Vec::with_capacity(n_layers + 1);
        let mut layers = Vec::with_capacity(slots);
        let mut next = || bufs.next().expect("one buffer per part");
        for _ in 0..n_layers {
            res.push(next());
            if !full {
                layers.push(LayerActs {
                    rstd1: next(),
                    qkv: next(),
                    att: next(),
                    lse: next(),
                    res_mid: next(),
                    rstd2: next(),
                    gu: next(),
                });
            }
        }
        let one = |len: usize, kind: Kind| b.alloc(len, kind);
        if full {
            let [r1, qkv, att, lse, rm, r2, gu] = layer_parts(0);
            layers.push(LayerActs {
                rstd1: one(r1.0, r1.1)?,
                qkv: one(qkv.0, qkv.1)?,
                att: one(att.0, att.1)?,
                lse: one(lse.0, lse.1)?,
                res_mid: one(rm.0, rm.1)?,
                rstd2: one(r2.0, r2.1)?,
                gu: one(gu.0, gu.1)?,
            });
        }
        res.push(one(cap * d, big)?);
        self.acts = Some(Acts {
            cap,
            res,
            layers,
            hf: one(cap * d, big)?,
            rstdf: one(cap, stat)?,
            s: Scratch {
                h: one(cap * d, big)?,
                a: one(cap * f, big)?,
                rstd_tmp: one(cap, stat)?,
                d_res: one(cap * d, big)?,
                d_h: one(cap * d, big)?,
                d_qkv: one(cap * w, big)?,
                d_att: one(cap * hd, big)?,
                d_a: one(cap * f, big)?,
                gu: one(cap * gu_len(mode.mlp_in_layer(0)), big)?,
            },
        });
        Ok(())
    }

    /// The per-layer slots' buffers, in order. With aliasing they come from one allocation that
    /// also holds the gradients (which then replace `self.grads`); else each on its own.
    fn alloc_slots(&mut self, b: &B, slots: &[Vec<(usize, Kind)>]) -> Result<Vec<B::Buf>> {
        if !self.alias_grads {
            return slots
                .iter()
                .flatten()
                .map(|&(len, kind)| Ok(b.alloc(len, kind)?))
                .collect();
        }
        // Offsets inside each slot, and the slot sizes.
        let mut rel = Vec::new();
        let mut sizes = Vec::new();
        for parts in slots {
            let mut at = 0;
            let mut offs = Vec::new();
            for &(len, kind) in parts {
                offs.push(at);
                at += align_up(len * b.kind_size(kind));
            }
            rel.push(offs);
            sizes.push(at);
        }
        let g = b.kind_size(Kind::Grad);
        let live = |l: usize| -> Vec<Range<usize>> {
            self.grads_written_above(l)
                .into_iter()
                .map(|r| r.start * g..r.end * g)
                .collect()
        };
        let limit: Vec<usize> = (0..slots.len())
            .map(|l| {
                live(l)
                    .iter()
                    .map(|r| r.start)
                    .min()
                    .unwrap_or(usize::MAX / 4)
            })
            .collect();
        let total = self.layout.total;
        let p = arena::place(&sizes, &limit, total * g);
        if !arena::disjoint(&p, &sizes, live) {
            return Err(ModelError::Input(format!(
                "bug: activation slots overlap live gradients: {p:?}"
            )));
        }
        let mut parts: Vec<(usize, usize, Kind)> = Vec::new();
        for ((ps, offs), &start) in slots.iter().zip(&rel).zip(&p.slots) {
            for (&(len, kind), &off) in ps.iter().zip(offs) {
                parts.push((start + off, len, kind));
            }
        }
        parts.push((p.grads, total, Kind::Grad));
        let mut bufs = b.alloc_parts(p.bytes, &parts)?;
        self.grads = bufs.pop().expect("the gradients' part");
        Ok(bufs)
    }

    /// Element ranges of the gradients written while layer `l`'s activations are still to be
    /// read: those of layers `l..`, the output head (written in the forward) and the final norm.
    /// An untied embedding's is written after every layer's backward.
    fn grads_written_above(&self, l: usize) -> Vec<Range<usize>> {
        let lay = &self.layout;
        let mut v = vec![lay.lm_head.clone(), lay.norm.clone()];
        for lr in &lay.layers[l..] {
            v.extend([
                lr.qkv_w.clone(),
                lr.o_w.clone(),
                lr.gate_up_w.clone(),
                lr.down_w.clone(),
                lr.ln1.clone(),
                lr.ln2.clone(),
            ]);
            v.extend(lr.qkv_b.clone());
            v.extend(lr.o_b.clone());
        }
        v
    }
}
