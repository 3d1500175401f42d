//! The model's activation buffers: sized for the largest batch so far and, with gradient
//! aliasing, placed in one allocation with the parameter gradients ([`crate::arena`]).

use std::ops::Range;

use nopad_backend::{Backend, Kind};

use super::offload::Offload;
use super::{GradState, Model};
use crate::arena;
use crate::error::{ModelError, Result};
use crate::layer::{LayerActs, QkNormActs, Scratch};
use crate::memory;
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
    /// The offloaded layers' ring and host buffers (`--offload activations:K`), if any.
    pub(crate) offload: Option<Offload<B>>,
}

/// One layer's saved activations from the next seven buffers (nine with q/k norms), in
/// `memory::act_parts` order.
pub(super) fn layer_acts<B: Backend>(
    next: &mut impl FnMut() -> B::Buf,
    qk_norm: bool,
) -> LayerActs<B> {
    LayerActs {
        rstd1: next(),
        qkv: next(),
        att: next(),
        lse: next(),
        res_mid: next(),
        rstd2: next(),
        gu: next(),
        qk_norm: qk_norm.then(|| QkNormActs {
            x: next(),
            rstd: next(),
        }),
    }
}

/// The layers' scratch from the next nine buffers, in `Scratch` field order.
pub(super) fn scratch<B: Backend>(next: &mut impl FnMut() -> B::Buf) -> Scratch<B> {
    Scratch {
        h: next(),
        a: next(),
        rstd_tmp: next(),
        d_res: next(),
        d_h: next(),
        d_qkv: next(),
        d_att: next(),
        d_a: next(),
        gu: next(),
    }
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
        let parts = memory::act_parts(&self.cfg, cap, self.recompute, self.offload);
        let mut bufs = self.alloc_slots(b, &parts.slots)?.into_iter();
        let (n_layers, qk_norm) = (self.cfg.num_hidden_layers, self.cfg.qk_norm);
        let mut res = Vec::with_capacity(n_layers + 1);
        let mut layers = Vec::with_capacity(slots);
        let mut next = || bufs.next().expect("one buffer per part");
        for _ in 0..n_layers {
            res.push(next());
            if !full {
                layers.push(layer_acts(&mut next, qk_norm));
            }
        }
        // The shared layer set and the tail, each on its own, in `act_parts` order.
        let mut own = parts
            .shared_layer
            .iter()
            .chain(&parts.tail)
            .map(|&(len, kind)| b.alloc(len, kind))
            .collect::<std::result::Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || own.next().expect("one buffer per part");
        if full {
            layers.push(layer_acts(&mut next, qk_norm));
        }
        res.push(next());
        let (hf, rstdf, s) = (next(), next(), scratch(&mut next));
        let gu = cap * 2 * self.cfg.intermediate_size;
        let offload = Offload::new(b, &self.homes, gu, vec![next(), next()])?;
        self.acts = Some(Acts {
            cap,
            res,
            layers,
            hf,
            rstdf,
            s,
            offload,
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
        let (rel, sizes) = memory::slot_bytes(slots, |k| b.kind_size(k));
        let g = b.kind_size(Kind::Grad);
        let live = |l: usize| -> Vec<Range<usize>> {
            memory::grads_written_above(&self.layout, l)
                .into_iter()
                .map(|r| r.start * g..r.end * g)
                .collect()
        };
        let limit = memory::grad_limits(&self.layout, g);
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
}
