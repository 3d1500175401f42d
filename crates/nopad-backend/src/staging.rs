//! [`Staging`]: page-locked host buffers and the asynchronous copies between them and the
//! device, the transport of an offloaded optimizer (`--offload optimizer`) and of offloaded
//! activations (`--offload activations:K`, `copy_to_host_unfenced`). Each host buffer
//! has a copy queue of its own beside the compute queue (a CUDA stream; on the CPU every copy is
//! done when the call returns), so a gradient can travel to the host, and new weights back,
//! while the compute queue runs the rest of the backward.
//!
//! Ordering is by events, and the rules are the same on every backend:
//! - a copy starts after the work queued on the compute queue before it (its source or
//!   destination was written or is still read by that work);
//! - the compute queue's later work waits for a copy *to* the host (the source may be
//!   overwritten next: the one-group gradient scratch), but not for a copy *from* the host
//!   until [`Staging::host_fence`] asks (new weights are needed only by the next forward);
//! - host reads and writes of a buffer ([`Staging::host_read`], [`Staging::host_write`]) wait
//!   for its copies first, so the host never sees a copy half done nor overwrites data in flight.
//!
//! Host buffers hold device elements (Grad: fp32 or bf16; Compute: bf16 or fp32 on CUDA), so a
//! copy moves the device's bytes and the conversion runs on the host.

use crate::{Device, Kind, Result};

/// Host staging buffers and copies (see the module docs).
pub trait Staging: Device {
    /// Page-locked host memory for `len` elements of one [`Kind`] in the device's element type,
    /// with its copy queue.
    type Host;

    /// A zero-filled host buffer of `len` elements of `kind` (Grad or Compute).
    fn host_alloc(&self, len: usize, kind: Kind) -> Result<Self::Host>;
    /// Number of elements of a host buffer.
    fn host_len(&self, host: &Self::Host) -> usize;
    /// Queues a copy of `src` into the first `src.len()` elements of `host` (same [`Kind`]) on
    /// the buffer's copy queue, after the compute queue's work so far; the compute queue's later
    /// work waits for it.
    fn copy_to_host(&self, src: Self::Ref<'_>, host: &mut Self::Host) -> Result<()>;
    /// Queues a copy of `src` into `host` as [`Staging::copy_to_host`] does, but the compute
    /// queue's later work does not wait for it: the caller fences (`host_fence`) before anything
    /// overwrites `src`. Activation offloading: a layer's activations travel to the host while
    /// the next layers compute, and only a later layer reuses their device buffer.
    fn copy_to_host_unfenced(&self, src: Self::Ref<'_>, host: &mut Self::Host) -> Result<()>;
    /// Queues a copy of the first `dst.len()` elements of `host` into `dst` (same [`Kind`]) on
    /// the buffer's copy queue, after the compute queue's work so far; the compute queue does
    /// not wait for it until [`Staging::host_fence`].
    fn copy_from_host(&self, host: &mut Self::Host, dst: Self::Mut<'_>) -> Result<()>;
    /// Makes the compute queue's later work wait for every copy of `host` queued so far.
    fn host_fence(&self, host: &Self::Host) -> Result<()>;
    /// Waits for the copies of `host`, then writes its first `out.len()` elements as f32.
    fn host_read(&self, host: &Self::Host, out: &mut [f32]) -> Result<()>;
    /// Waits for the copies of `host`, then sets its first `vals.len()` elements to the weights
    /// `vals` as the parameters hold them: rounded the way the backend's master copy rounds into
    /// its Compute parameters ([`crate::OptimizerOps::master_write`]), so an update on the host
    /// gives the forward the weights an update on the device would.
    fn host_write(&self, host: &mut Self::Host, vals: &[f32]) -> Result<()>;
}
