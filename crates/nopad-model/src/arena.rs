//! One allocation for the saved activations and the parameter gradients, for optimizer steps of
//! a single micro-batch ([`crate::Model::set_grad_aliasing`]).
//!
//! The forward fills one *slot* per layer: its input residual stream and what its backward reads.
//! The backward walks the layers down; at layer `l` it writes that layer's gradients while the
//! slots of layers `0..=l` still have to be read, and the slots above `l` are dead. So layer `l`'s
//! gradients may lie over the slots of the layers above it, and nowhere else; the gradients
//! written earlier (the output head's in the forward, the final norm's first in the backward)
//! over no slot at all. With the layers' matrices first in the parameter layout, lowest layer
//! first ([`crate::Layout`]), stacking the slots upwards so that slot `l` ends below the first
//! gradient written while it is live does exactly that.
//!
//! What it saves: with slots of A bytes per layer and G bytes of gradients per layer (A > G, any
//! batch of more than a few hundred tokens), L layers take `L·A + P·g − (L − 1)·G` bytes instead
//! of `L·A + P·g` (P parameters, g bytes per gradient): for Llama-3.2-1B with bf16 gradients,
//! 1.7 GiB.

use std::ops::Range;

/// Alignment of every part's byte offset (what [`nopad_backend::Backend::alloc_parts`] asks).
pub(crate) const ALIGN: usize = 256;

/// Where the slots and the gradients lie in the allocation, in bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Start of each slot.
    pub slots: Vec<usize>,
    /// Start of the gradients.
    pub grads: usize,
    /// Size of the allocation.
    pub bytes: usize,
}

pub(crate) fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Places slots of `slot_bytes[l]` bytes (multiples of [`ALIGN`]) and `grad_bytes` bytes of
/// gradients so that slot `l` ends at or below byte `limit[l]` of the gradients: the first
/// gradient byte written while slot `l` is live. Smallest allocation for that order of slots.
pub(crate) fn place(slot_bytes: &[usize], limit: &[usize], grad_bytes: usize) -> Placement {
    assert_eq!(slot_bytes.len(), limit.len(), "one limit per slot");
    // Slot l = [x0 + cum[l] − A_l, x0 + cum[l]) with cum[l] = Σ_{j ≤ l} A_j; it needs
    // x0 + cum[l] ≤ g0 + limit[l], so x0 = g0 + min_l (limit[l] − cum[l]).
    let mut cum = 0i128;
    let mut m = i128::MAX;
    for (&a, &lim) in slot_bytes.iter().zip(limit) {
        cum += a as i128;
        m = m.min(lim as i128 - cum);
    }
    if slot_bytes.is_empty() {
        return Placement {
            slots: Vec::new(),
            grads: 0,
            bytes: grad_bytes,
        };
    }
    let g0 = if m < 0 { align_up((-m) as usize) } else { 0 };
    // Rounding x0 down keeps every slot below its limit and aligned.
    let x0 = (g0 as i128 + m) as usize / ALIGN * ALIGN;
    let mut slots = Vec::with_capacity(slot_bytes.len());
    let mut at = x0;
    for &a in slot_bytes {
        slots.push(at);
        at += a;
    }
    Placement {
        slots,
        grads: g0,
        bytes: (g0 + grad_bytes).max(at),
    }
}

/// Whether no slot overlaps a gradient byte range written while it is live
/// (`live_grads(l)`, byte ranges relative to the gradients' start).
pub(crate) fn disjoint(
    p: &Placement,
    slot_bytes: &[usize],
    live_grads: impl Fn(usize) -> Vec<Range<usize>>,
) -> bool {
    p.slots
        .iter()
        .zip(slot_bytes)
        .enumerate()
        .all(|(l, (&s, &a))| {
            live_grads(l).iter().all(|r| {
                let (g0, g1) = (p.grads + r.start, p.grads + r.end);
                r.is_empty() || s + a <= g0 || g1 <= s
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model-like case: layer l's gradients `[l·g, (l+1)·g)`, then `rest` bytes written in the
    /// forward; slot l may overlap only the gradients of layers below l.
    fn case(slots: &[usize], g: usize, rest: usize) {
        let l = slots.len();
        let limit: Vec<usize> = (0..l).map(|i| i * g).collect();
        let grad_bytes = l * g + rest;
        let p = place(slots, &limit, grad_bytes);
        let live = |i: usize| std::iter::once(i * g..grad_bytes).collect();
        assert!(disjoint(&p, slots, live), "{slots:?} g={g}: {p:?}");
        // Slots are disjoint from each other and inside the allocation.
        for i in 1..l {
            assert_eq!(p.slots[i], p.slots[i - 1] + slots[i - 1]);
        }
        assert!(p.slots[l - 1] + slots[l - 1] <= p.bytes);
        assert!(p.grads + grad_bytes <= p.bytes);
        assert!(p.slots.iter().chain([&p.grads]).all(|o| o % ALIGN == 0));
        let separate: usize = slots.iter().sum::<usize>() + grad_bytes;
        // Never more than separate buffers; with slots larger than a layer's gradients the
        // saving is (L − 1)·g.
        assert!(p.bytes <= separate + ALIGN, "{p:?} vs {separate}");
        if slots.iter().all(|&a| a >= g) {
            assert_eq!(p.bytes, separate - (l - 1) * g, "{slots:?} g={g}");
        }
    }

    #[test]
    fn slots_never_meet_live_gradients_and_the_saving_is_exact() {
        let k = ALIGN;
        case(&[10 * k; 16], 3 * k, 40 * k); // activations larger than gradients (1B-like)
        case(&[2 * k; 16], 3 * k, 40 * k); // a short batch: gradients larger
        case(&[k, 9 * k, 2 * k, 7 * k], 4 * k, k); // uneven slots (partial recomputation)
        case(&[5 * k], 3 * k, 2 * k); // one layer
        case(&[k; 3], 0, 0); // degenerate: no gradients
    }

    #[test]
    fn a_misplaced_slot_is_detected() {
        let p = Placement {
            slots: vec![0, 256],
            grads: 0,
            bytes: 1024,
        };
        assert!(!disjoint(&p, &[256, 256], |_| std::iter::once(300..400).collect()));
        assert!(disjoint(&p, &[256, 256], |_| vec![512..600, 100..100]));
    }
}
