//! Activation offloading (`--offload activations:K`): K layers keep their gate/up projections
//! `[N, 2F]`, two thirds of what a layer saves, in page-locked host memory instead of on the
//! device, without recomputing anything.
//!
//! The offloaded layers (spread over the stack by [`crate::recompute::gu_homes`]) take turns in
//! a ring of two device buffers, in layer order. In the forward, offloaded layer j writes its
//! projections into buffer `j % 2` and, once the SwiGLU has read them, they are copied to the
//! host on the host buffer's own copy queue while the next layers compute; layer j + 2 waits for
//! that copy before it writes the same buffer. The last two offloaded layers' projections never
//! leave their buffers (the backward starts with them). In the backward, when offloaded layer j
//! starts, offloaded layer j - 1's projections are copied back into its buffer (free: the layer
//! above that used it has run its backward), so the copy overlaps layer j's backward; layer j
//! itself waits for its own copy (queued one offloaded layer earlier) before it reads them.
//!
//! The values are the same bits as kept ones (a copy each way), so results equal
//! `--offload none` exactly; only the device memory (K - 2 layers' projections less) and the
//! traffic over PCIe (2·N·2F bytes each way per offloaded layer) change. A copy that takes
//! longer than the layers it overlaps makes the compute queue wait at the fence.

use nopad_backend::{Backend, Kind};

use crate::error::Result;
use crate::recompute::GuHome;

/// The ring of device buffers, and each offloaded layer's host buffer.
pub(crate) struct Offload<B: Backend> {
    /// `[cap, 2F]` device buffers the offloaded layers take turns in (one or two).
    ring: Vec<B::Buf>,
    /// In layer order: each offloaded layer's host buffer `[cap, 2F]`.
    host: Vec<B::Host>,
    /// Per layer: its index among the offloaded layers.
    ord: Vec<Option<usize>>,
}

impl<B: Backend> Offload<B> {
    /// Host buffers of `len` elements for the layers `homes` offloads, and `ring` (the non-empty
    /// ones of the two the activations allocated). None when no layer is offloaded.
    pub(crate) fn new(
        b: &B,
        homes: &[GuHome],
        len: usize,
        ring: Vec<B::Buf>,
    ) -> Result<Option<Self>> {
        let mut ord = vec![None; homes.len()];
        let mut host = Vec::new();
        for (l, _) in homes
            .iter()
            .enumerate()
            .filter(|(_, &h)| h == GuHome::Offloaded)
        {
            ord[l] = Some(host.len());
            host.push(b.host_alloc(len, Kind::Compute)?);
        }
        if host.is_empty() {
            return Ok(None);
        }
        let ring: Vec<_> = ring.into_iter().take(host.len().min(2)).collect();
        Ok(Some(Offload { ring, host, ord }))
    }

    /// Whether offloaded layer `j`'s projections stay in their ring buffer from its forward to
    /// its backward (the last `ring` offloaded layers: no later one reuses the buffer).
    fn stays(&self, j: usize) -> bool {
        j + self.ring.len() >= self.host.len()
    }

    /// Before layer `l`'s forward: if offloaded, its turn's ring buffer becomes `gu` once the
    /// copy of the layer that used the buffer last has reached the host.
    pub(crate) fn enter_forward(&mut self, b: &B, l: usize, gu: &mut B::Buf) -> Result<()> {
        let Some(j) = self.ord[l] else {
            return Ok(());
        };
        let r = self.ring.len();
        if j >= r {
            b.host_fence(&self.host[j - r])?;
        }
        std::mem::swap(gu, &mut self.ring[j % r]);
        Ok(())
    }

    /// After layer `l`'s forward: `gu` back to the ring and, in a training pass (`train`), its
    /// first `len` elements on their way to the host unless they stay in the buffer.
    pub(crate) fn leave_forward(
        &mut self,
        b: &B,
        l: usize,
        gu: &mut B::Buf,
        len: usize,
        train: bool,
    ) -> Result<()> {
        let Some(j) = self.ord[l] else {
            return Ok(());
        };
        let r = self.ring.len();
        std::mem::swap(gu, &mut self.ring[j % r]);
        if train && !self.stays(j) {
            b.copy_to_host_unfenced(b.view(&self.ring[j % r], 0..len), &mut self.host[j])?;
        }
        Ok(())
    }

    /// Before layer `l`'s backward: the offloaded layer below starts its way back, this layer's
    /// own copy is awaited, and its ring buffer becomes `gu`.
    pub(crate) fn enter_backward(
        &mut self,
        b: &B,
        l: usize,
        gu: &mut B::Buf,
        len: usize,
    ) -> Result<()> {
        let Some(j) = self.ord[l] else {
            return Ok(());
        };
        let r = self.ring.len();
        if j >= 1 && !self.stays(j - 1) {
            // Its buffer's user above it (offloaded layer j + 1) has run its backward.
            let dst = b.view_mut(&mut self.ring[(j - 1) % r], 0..len);
            b.copy_from_host(&mut self.host[j - 1], dst)?;
        }
        if !self.stays(j) {
            b.host_fence(&self.host[j])?;
        }
        std::mem::swap(gu, &mut self.ring[j % r]);
        Ok(())
    }

    /// After layer `l`'s backward: `gu` back to the ring.
    pub(crate) fn leave_backward(&mut self, l: usize, gu: &mut B::Buf) {
        if let Some(j) = self.ord[l] {
            let r = self.ring.len();
            std::mem::swap(gu, &mut self.ring[j % r]);
        }
    }
}
