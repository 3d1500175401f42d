//! The model's side of ZeRO stage 3 (FSDP-style weight sharding): a rank holds only its piece
//! of each parameter range, and a pass asks for each group's weights just ahead of their use
//! ([`WeightSource`]), in the forward, again from the top down in the backward (whose
//! recomputation reads the same slot), and at their points of use for the embedding, the final
//! norm and the head.
//!
//! [`Model::params`] of a sharded model is `[Σ piece]`: this rank's pieces, one after the other
//! in the order they were given ([`Model::new_sharded`]); it is what the optimizer updates and
//! what checkpoints write into. The weights a pass reads lie in a `resident` buffer placed by
//! [`Slots::weights`]: two alternating layer slots (layer `l` in slot `l % 2`, so the gather of
//! layer `l + 1` can be issued while layer `l` computes) plus the embedding, the untied head and
//! the final norm, which stay gathered for the whole pass (they are used at both of its ends).
//! Bringing a group in copies this rank's pieces into place and lets the source fill the rest
//! (a collective all-gather, in nopad-train); a model run by one rank over a [`Resident`]
//! source has every piece whole, so nothing else moves.
//!
//! nopad-model knows nothing of collectives: the source is a trait object handed to each pass.

use std::ops::Range;

use nopad_backend::{Backend, Kind};

use super::grad_slots::Slots;
use super::{Inputs, Model};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layout::{GroupKind, Layout};

/// Where in a pass a group's weights are asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The forward (training or evaluation).
    Forward,
    /// The backward, and its recomputed forward of a layer.
    Backward,
}

/// Where a group's ranges go: each parameter range and where it starts in the buffer.
pub type Placed = [(Range<usize>, usize)];

/// Where a pass's weights come from, asked for each parameter group just ahead of its use.
pub trait WeightSource<B: Backend> {
    /// How many ranks hold a piece of each parameter range (1: this one holds them whole).
    fn ranks(&self) -> usize;

    /// Makes the weights of group `what.0` whole in `to.0` for phase `what.1`: each
    /// `(range, at)` of `to.1` is a parameter range to lie at `to.0[at..at + range.len()]`,
    /// where this rank's piece of it already lies at its place. Every rank makes the same calls
    /// in the same order. The default brings nothing, which suits a rank that holds every
    /// weight.
    fn materialise(
        &mut self,
        b: &B,
        what: (GroupKind, Phase),
        to: (&mut B::Buf, &Placed),
    ) -> Result<()> {
        let _ = (b, what, to);
        Ok(())
    }
}

/// The source of a rank that holds every weight: nothing to bring (an unsharded model, or a
/// sharded one run by a single rank).
#[derive(Clone, Copy, Debug, Default)]
pub struct Resident;

impl<B: Backend> WeightSource<B> for Resident {
    fn ranks(&self) -> usize {
        1
    }
}

/// One parameter range of a group and the part of it this rank holds (absolute offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The whole range, as every rank sees it.
    pub range: Range<usize>,
    /// This rank's part of it (possibly empty).
    pub own: Range<usize>,
}

/// A sharded model's map and gathered weights.
pub(crate) struct Sharded<B: Backend> {
    /// Every range of every group, with where its piece starts in [`Model::params`].
    pieces: Vec<(Piece, usize)>,
    /// Ranks the pieces are spread over.
    ranks: usize,
    /// The weights a pass reads, placed by `slots`.
    pub resident: B::Buf,
    slots: Slots,
    /// The groups' kinds, in `slots.groups` order.
    kinds: Vec<GroupKind>,
    /// The layout as the forward and backward view `resident`.
    pub views: Layout,
}

impl<B: Backend> Sharded<B> {
    /// The map of `pieces` (one per range of every group of `layout`) and the resident
    /// weights; also the length of the pieces' buffer.
    pub(crate) fn new(
        b: &B,
        layout: &Layout,
        pieces: &[Piece],
        ranks: usize,
    ) -> Result<(Self, usize)> {
        let mut at = 0;
        let mut placed = Vec::with_capacity(pieces.len());
        for (g, r) in layout
            .groups
            .iter()
            .flat_map(|g| g.ranges().map(move |r| (g, r.0)))
        {
            let Some(p) = pieces.iter().find(|p| p.range == r) else {
                return Err(ModelError::Input(format!(
                    "sharded model: no piece of group `{}`'s range {r:?}",
                    g.kind
                )));
            };
            if p.own.start < r.start || p.own.end > r.end || p.own.start > p.own.end {
                return Err(ModelError::Input(format!(
                    "sharded model: piece {:?} is not inside its range {r:?}",
                    p.own
                )));
            }
            placed.push((p.clone(), at));
            at += p.own.len();
        }
        if placed.len() != pieces.len() {
            return Err(ModelError::Input(format!(
                "sharded model: {} pieces for the layout's {} ranges",
                pieces.len(),
                placed.len()
            )));
        }
        let slots = Slots::weights(layout);
        let resident = b.alloc(slots.len, Kind::Compute).map_err(|e| {
            e.while_allocating(|| {
                format!(
                    "the gathered weights of two layers and the embedding, head and norm ({} elements)",
                    slots.len
                )
            })
        })?;
        let views = Layout {
            embed: slots.embed.clone(),
            layers: slots.layers.clone(),
            lm_head: slots.lm_head.clone(),
            norm: slots.norm.clone(),
            decay_end: 0,
            total: slots.len,
            // Nothing reads these through the views: loading goes through the full layout.
            tensors: Vec::new(),
            groups: Vec::new(),
        };
        let sharded = Sharded {
            pieces: placed,
            ranks,
            resident,
            slots,
            kinds: layout.groups.iter().map(|g| g.kind).collect(),
            views,
        };
        Ok((sharded, at))
    }

    /// Brings group `kind`'s weights into the resident buffer: this rank's pieces from
    /// `params`, the rest from `src`.
    pub(crate) fn fetch(
        &mut self,
        b: &B,
        params: &B::Buf,
        (kind, phase): (GroupKind, Phase),
        src: &mut dyn WeightSource<B>,
    ) -> Result<()> {
        let Some(i) = self.kinds.iter().position(|k| *k == kind) else {
            return Err(ModelError::Input(format!(
                "no parameter group {kind} in the layout"
            )));
        };
        for (r, at) in &self.slots.groups[i] {
            let Some((p, from)) = self.pieces.iter().find(|(p, _)| p.range == *r) else {
                return Err(ModelError::Input(format!("no piece of the range {r:?}")));
            };
            let n = p.own.len();
            if n == 0 {
                continue;
            }
            // A device copy: zero, then add (exact).
            let to = at + (p.own.start - r.start);
            b.zero(b.view_mut(&mut self.resident, to..to + n))?;
            b.add_assign(
                b.view_mut(&mut self.resident, to..to + n),
                b.view(params, *from..from + n),
                n,
            )?;
        }
        src.materialise(
            b,
            (kind, phase),
            (&mut self.resident, &self.slots.groups[i]),
        )
    }

    /// Writes host values at `offset` of the full layout: what falls in this rank's pieces.
    pub(crate) fn write(
        &self,
        b: &B,
        (params, at): (&mut B::Buf, usize),
        vals: &[f32],
    ) -> Result<()> {
        let (offset, end) = (at, at + vals.len());
        for (p, at) in &self.pieces {
            let (lo, hi) = (p.own.start.max(offset), p.own.end.min(end));
            if lo < hi {
                b.write(
                    params,
                    at + (lo - p.own.start),
                    &vals[lo - offset..hi - offset],
                )?;
            }
        }
        Ok(())
    }
}

impl<B: Backend> Model<B> {
    /// A model of which this rank holds only `pieces` (one per range of every parameter group,
    /// each with the part this rank keeps; ZeRO stage 3), over `ranks` ranks. Fill it as
    /// [`Model::new`] (initialisation and loading hand whole tensors to
    /// [`Model::write_params`], which keeps this rank's part); run it with the `*_from` passes
    /// and a [`WeightSource`] that brings the other ranks' parts. It keeps one group's
    /// gradient at a time ([`Model::set_update_in_backward`] is on and stays on).
    pub fn new_sharded(b: &B, cfg: Config, pieces: &[Piece], ranks: usize) -> Result<Self> {
        Self::build(b, cfg, true, None, Some((pieces, ranks)))
    }

    /// [`Model::forward_train`] with each group's weights brought by `src` just ahead of their
    /// use (a sharded model, [`Model::new_sharded`]).
    pub fn forward_train_from(
        &mut self,
        b: &B,
        x: &Inputs<'_>,
        scale: f32,
        src: &mut dyn WeightSource<B>,
    ) -> Result<()> {
        self.forward(b, x, Some(scale), src)
    }

    /// [`Model::forward_eval`] with the weights brought by `src` (see
    /// [`Model::forward_train_from`]).
    pub fn forward_eval_from(
        &mut self,
        b: &B,
        x: &Inputs<'_>,
        src: &mut dyn WeightSource<B>,
    ) -> Result<()> {
        self.forward(b, x, None, src)
    }

    /// Whether this model holds only its pieces of the weights ([`Model::new_sharded`]).
    pub fn is_sharded(&self) -> bool {
        self.sharded.is_some()
    }

    /// The pieces a sharded model holds, in the order of its parameter buffer (none for a
    /// model that holds every weight).
    pub fn pieces(&self) -> Vec<Piece> {
        let all = self.sharded.iter().flat_map(|s| &s.pieces);
        all.map(|(p, _)| p.clone()).collect()
    }

    /// Parameter elements this rank allocates: the pieces and the resident weights of a
    /// sharded model, else the parameter buffer (and the adapters').
    pub fn param_elements(&self, b: &B) -> usize {
        let own = b.buf_len(&self.params);
        let resident = self.sharded.as_ref().map_or(0, |s| b.buf_len(&s.resident));
        let adapters = self.adapter.as_ref().map_or(0, |a| b.buf_len(&a.params));
        own + resident + adapters
    }

    /// An error unless `src` brings the parts of as many ranks as this model's pieces are
    /// spread over (any source suits a model that holds every weight).
    pub(super) fn check_source(&self, src: &dyn WeightSource<B>) -> Result<()> {
        match &self.sharded {
            Some(s) if s.ranks != src.ranks() => Err(ModelError::Input(format!(
                "this model holds a piece of every weight of {} ranks, but the pass's weight source joins {}",
                s.ranks,
                src.ranks()
            ))),
            _ => Ok(()),
        }
    }
}

/// Brings group `kind`'s weights where the pass reads them (nothing to do for a model that
/// holds them all).
pub(super) fn fetch<B: Backend>(
    b: &B,
    params: &B::Buf,
    sharded: &mut Option<Sharded<B>>,
    what: (GroupKind, Phase),
    src: &mut dyn WeightSource<B>,
) -> Result<()> {
    match sharded {
        Some(s) => s.fetch(b, params, what, src),
        None => Ok(()),
    }
}

/// [`fetch`] for the groups above the layers: the final norm, and the head when untied (a
/// tied head is the embedding, fetched at the start of the forward).
pub(super) fn fetch_top<B: Backend>(
    b: &B,
    params: &B::Buf,
    sharded: &mut Option<Sharded<B>>,
    (layout, phase): (&Layout, Phase),
    src: &mut dyn WeightSource<B>,
) -> Result<()> {
    fetch(b, params, sharded, (GroupKind::FinalNorm, phase), src)?;
    if layout.group(GroupKind::Head).is_some() {
        fetch(b, params, sharded, (GroupKind::Head, phase), src)?;
    }
    Ok(())
}

/// The buffer a pass reads the weights from: the resident weights of a sharded model, else
/// the parameters.
pub(super) fn weights<'a, B: Backend>(
    params: &'a B::Buf,
    sharded: &'a Option<Sharded<B>>,
) -> &'a B::Buf {
    sharded.as_ref().map_or(params, |s| &s.resident)
}

#[cfg(test)]
mod tests {
    use nopad_backend::cpu::Cpu;
    use nopad_backend::Device;
    use nopad_rng::Rng;

    use super::*;
    use crate::tests::{examples, flatten, init_base, tiny, tiny_qwen3};
    use crate::{ModelError, Recompute};

    type B = Cpu<f32>;

    /// The other ranks, played from a host copy of the whole model: fills each range but this
    /// rank's piece (which must already be in place), and notes each call.
    struct FromHost {
        full: Vec<f32>,
        pieces: Vec<Piece>,
        calls: Vec<(GroupKind, Phase)>,
    }

    impl WeightSource<B> for FromHost {
        fn ranks(&self) -> usize {
            3
        }

        fn materialise(
            &mut self,
            b: &B,
            what: (GroupKind, Phase),
            (buf, placed): (&mut <B as Device>::Buf, &Placed),
        ) -> Result<()> {
            self.calls.push(what);
            for (r, at) in placed {
                let p = self.pieces.iter().find(|p| p.range == *r).unwrap();
                b.write(buf, *at, &self.full[r.start..p.own.start])?;
                let after = at + (p.own.end - r.start);
                b.write(buf, after, &self.full[p.own.end..r.end])?;
            }
            Ok(())
        }
    }

    /// The middle third of every range of every group.
    fn thirds(layout: &Layout) -> Vec<Piece> {
        let ranges = layout
            .groups
            .iter()
            .flat_map(|g| g.ranges().map(|(r, _)| r));
        ranges
            .map(|r| {
                let third = r.len() / 3;
                let own = r.start + third..r.start + 2 * third;
                Piece { range: r, own }
            })
            .collect()
    }

    /// Each group's gradient, as the backward hands it over.
    fn run(
        b: &B,
        m: &mut Model<B>,
        x: &crate::Inputs<'_>,
        src: &mut dyn WeightSource<B>,
    ) -> (f64, Vec<(GroupKind, Vec<f32>)>) {
        m.zero_grads(b).unwrap();
        m.forward_train_from(b, x, 0.05, src).unwrap();
        let mut grads = vec![];
        m.backward_from(b, src, |g| {
            for (r, _) in g.group.ranges() {
                grads.push((g.group.kind, b.read(g.grads, g.grad_range(&r))?));
            }
            Ok::<(), ModelError>(())
        })
        .unwrap();
        (m.take_loss_sum(b).unwrap(), grads)
    }

    /// A rank holding a third of every range, the rest brought by its source group by group,
    /// computes the plain model's loss and gradients bit for bit, asks for the groups in the
    /// order of their use, and allocates its pieces plus two layers and the non-layer groups.
    #[test]
    fn a_sharded_model_gathers_each_group_ahead_of_its_use_and_matches_the_whole_one() {
        let b = B::new();
        let modes = [
            (tiny(false, true), Recompute::None),
            (tiny(true, true), Recompute::Full),
            (tiny(false, true), Recompute::Mlp(None)),
            (tiny_qwen3(true, false), Recompute::Full),
            (tiny_qwen3(false, true), Recompute::None),
        ];
        for (cfg, recompute) in modes {
            let tied = cfg.tie_word_embeddings;
            let p = flatten(&examples(&mut Rng::new(5), &[9, 4, 13], cfg.vocab_size));
            let mut whole = Model::new(&b, cfg.clone()).unwrap();
            init_base(&b, &mut whole, cfg.clone(), 8);
            whole.set_recompute(recompute);
            whole.set_update_in_backward(&b, true).unwrap();
            let want = run(&b, &mut whole, &p.inputs(), &mut Resident);
            let layout = whole.layout.clone();
            let pieces = thirds(&layout);
            let mut m = Model::new_sharded(&b, cfg.clone(), &pieces, 3).unwrap();
            init_base(&b, &mut m, cfg.clone(), 8);
            m.set_recompute(recompute);
            assert!(m.is_sharded() && m.updates_in_backward());
            let e = m.forward_train(&b, &p.inputs(), 0.05).unwrap_err();
            assert!(e.to_string().contains("joins 1"), "{e}");
            let mut src = FromHost {
                full: b.read(&whole.params, 0..layout.total).unwrap(),
                pieces: pieces.clone(),
                calls: vec![],
            };
            for _ in 0..2 {
                src.calls.clear();
                let got = run(&b, &mut m, &p.inputs(), &mut src);
                assert_eq!(got.0.to_bits(), want.0.to_bits(), "tied={tied} loss");
                assert_eq!(got.1, want.1, "tied={tied} {recompute:?}: gradients");
            }
            let (fwd, bwd) = (Phase::Forward, Phase::Backward);
            let n = layout.layers.len();
            let mut order = vec![(GroupKind::Embedding, fwd)];
            order.extend((0..n).map(|l| (GroupKind::Layer(l), fwd)));
            order.push((GroupKind::FinalNorm, fwd));
            if !tied {
                order.push((GroupKind::Head, fwd));
            }
            order.extend((0..n).rev().map(|l| (GroupKind::Layer(l), bwd)));
            assert_eq!(src.calls, order);
            // Its pieces, two layers, the embedding, head and norm (each range aligned to 64).
            let own: usize = pieces.iter().map(|p| p.own.len()).sum();
            let size = |k| layout.group(k).map_or(0, |g| g.len());
            let resident = 2 * size(GroupKind::Layer(0))
                + size(GroupKind::Embedding)
                + size(GroupKind::Head)
                + size(GroupKind::FinalNorm);
            // The memory plan counts the same.
            let held = m.param_elements(&b);
            let planned = crate::memory::gathered_weights_len(&layout);
            assert_eq!(held, own + planned);
            assert!(
                planned >= resident && planned <= resident + 64 * 8,
                "{planned}"
            );
            assert!(m.set_update_in_backward(&b, false).is_err());
        }
    }

    /// One rank holding every piece whole runs over [`Resident`], as an unsharded model.
    #[test]
    fn a_sharded_model_of_one_rank_needs_no_source() {
        let b = B::new();
        let cfg = tiny(false, false);
        let p = flatten(&examples(&mut Rng::new(6), &[7, 11], cfg.vocab_size));
        let mut whole = Model::new(&b, cfg.clone()).unwrap();
        init_base(&b, &mut whole, cfg.clone(), 3);
        whole.set_update_in_backward(&b, true).unwrap();
        let want = run(&b, &mut whole, &p.inputs(), &mut Resident);
        let pieces: Vec<Piece> = (whole.layout.groups.iter())
            .flat_map(|g| {
                g.ranges().map(|(r, _)| Piece {
                    own: r.clone(),
                    range: r,
                })
            })
            .collect();
        let mut m = Model::new_sharded(&b, cfg.clone(), &pieces, 1).unwrap();
        init_base(&b, &mut m, cfg, 3);
        assert_eq!(run(&b, &mut m, &p.inputs(), &mut Resident), want);
        let missing = &pieces[1..];
        let e = Model::new_sharded(&b, tiny(false, false), missing, 1)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no piece"), "{e}");
    }
}
