//! The [`Device`] half of a backend: buffers, views, host transfers, synchronisation and the
//! instrumentation (memory peaks, timestamps). Nothing here computes; the math is in
//! [`crate::Ops`], the optimizer's storage in [`crate::OptimizerOps`].

use std::ops::Range;

use crate::{BackendError, Result};

/// Storage class of a buffer. The backend decides the element type of each class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Weights as the forward pass reads them, activations and activation gradients:
    /// bf16 on CUDA in mixed precision, the scalar type on the CPU.
    Compute,
    /// Optimizer moments, master weights, statistics: fp32 on CUDA, the scalar type on the CPU.
    Master,
    /// Parameter gradients: fp32 on CUDA unless `CudaOptions::bf16_grads` (bf16, each GEMM still
    /// accumulating in fp32 and rounding once per write), the scalar type on the CPU.
    Grad,
    /// AdamW moments kept in 16 bits (`StatePrecision::Bf16`): bf16 on CUDA whatever the Compute
    /// type; the scalar type on the CPU, holding bf16-representable values.
    Moment16,
    /// 8-bit codes of block-quantised moments (`StatePrecision::Block8`): one byte on CUDA; the
    /// scalar type on the CPU, holding the code 0..=255 as a number.
    Code8,
}

/// How a device counts the bytes of its buffers, for predicting [`Device::peak_memory`] without
/// allocating (the memory plan). The CPU's defaults: every buffer counts its exact bytes, and
/// [`Device::alloc_parts`] allocates each part on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accounting {
    /// Each buffer counts its bytes rounded up to a multiple of this (at least one unit, even
    /// when empty, where it is above 1): 512 on CUDA, as PyTorch counts `max_memory_allocated`.
    pub round: usize,
    /// Whether the parts of [`Device::alloc_parts`] share one allocation (so overlapping parts
    /// cost their union once).
    pub shares_parts: bool,
    /// Whether ops take scratch buffers from the same pool as the callers' buffers (CUDA: the
    /// cuBLASLt workspace, the output head's logits chunk, the uploaded integer arrays), so
    /// they count towards the peak; the CPU's scratch is host memory it does not count.
    pub pooled_scratch: bool,
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            round: 1,
            shares_parts: false,
            pooled_scratch: false,
        }
    }
}

/// Checks the parts of [`Device::alloc_parts`]: aligned offsets, inside the allocation.
pub(crate) fn check_parts(
    bytes: usize,
    parts: &[(usize, usize, Kind)],
    size: impl Fn(Kind) -> usize,
) -> Result<()> {
    for (i, &(off, len, kind)) in parts.iter().enumerate() {
        let end = len.checked_mul(size(kind)).and_then(|b| b.checked_add(off));
        if off % 256 != 0 || end.is_none_or(|e| e > bytes) {
            return Err(BackendError::Shape {
                op: "alloc_parts",
                what: format!(
                    "part {i} ({len} x {kind:?} at byte {off}) is unaligned or outside the {bytes} bytes"
                ),
            });
        }
    }
    Ok(())
}

/// Device memory and the queue: everything a backend does that is not math.
///
/// Buffers are owned by [`Device::Buf`]; ops take borrowed views ([`Device::Ref`],
/// [`Device::Mut`]) so that one tensor of a flat parameter buffer can be passed without a copy.
pub trait Device {
    /// An owned buffer of one [`Kind`].
    type Buf;
    /// A read-only view of (part of) a buffer.
    type Ref<'a>: Copy
    where
        Self: 'a;
    /// A writable view of (part of) a buffer.
    type Mut<'a>
    where
        Self: 'a;
    /// An `i32` array on the device (token ids, position ids, targets, `cu_seqlens`).
    type Ints;

    /// Human-readable description of the device, for logs and summaries.
    fn describe(&self) -> String;

    // ---- memory and transfer ----------------------------------------------------------------

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, kind: Kind) -> Result<Self::Buf>;
    /// Bytes of one element of a [`Kind`].
    fn kind_size(&self, kind: Kind) -> usize;
    /// Zero-filled buffers carved out of one allocation of `bytes` bytes: part `i` is
    /// `parts[i] = (byte offset, elements, kind)`. Parts may overlap; the caller guarantees that
    /// overlapping parts never hold data it needs at the same time (the model places parameter
    /// gradients over activations that are dead by the time the gradients are written). Offsets
    /// must be multiples of 256 and parts must lie inside `bytes`. The default allocates every
    /// part on its own (no aliasing: the same results with more memory), which is what the CPU
    /// backend does.
    fn alloc_parts(&self, bytes: usize, parts: &[(usize, usize, Kind)]) -> Result<Vec<Self::Buf>> {
        check_parts(bytes, parts, |k| self.kind_size(k))?;
        parts
            .iter()
            .map(|&(_, len, kind)| self.alloc(len, kind))
            .collect()
    }
    /// Number of elements of a buffer.
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// A view of `range` of a buffer.
    fn view<'a>(&'a self, buf: &'a Self::Buf, range: Range<usize>) -> Self::Ref<'a>;
    /// A writable view of `range` of a buffer.
    fn view_mut<'a>(&'a self, buf: &'a mut Self::Buf, range: Range<usize>) -> Self::Mut<'a>;
    /// Two writable views of disjoint ranges of one buffer (a weight gradient and its bias
    /// gradient). Overlapping ranges are a caller bug and panic.
    fn view_mut2<'a>(
        &'a self,
        buf: &'a mut Self::Buf,
        a: Range<usize>,
        b: Range<usize>,
    ) -> (Self::Mut<'a>, Self::Mut<'a>);
    /// Copies host values into `buf[offset..offset + data.len()]` (converting to the buffer type).
    fn write(&self, buf: &mut Self::Buf, offset: usize, data: &[f32]) -> Result<()>;
    /// Copies `buf[range]` to the host as f32.
    fn read(&self, buf: &Self::Buf, range: Range<usize>) -> Result<Vec<f32>>;
    /// Copies `buf[range]` to the host as f64 (exact for f64 buffers; the default widens f32).
    fn read_f64(&self, buf: &Self::Buf, range: Range<usize>) -> Result<Vec<f64>> {
        Ok(self.read(buf, range)?.into_iter().map(f64::from).collect())
    }
    /// Sets a view to zero.
    fn zero(&self, x: Self::Mut<'_>) -> Result<()>;
    /// Uploads an i32 array.
    fn ints(&self, data: &[i32]) -> Result<Self::Ints>;
    /// Waits for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;

    // ---- instrumentation --------------------------------------------------------------------

    /// Most bytes held by live buffers at once so far (like `torch.cuda.max_memory_allocated`).
    fn peak_memory(&self) -> usize;
    /// Bytes of memory the device has in all (CUDA: `cuMemGetInfo`'s total), or `None` where
    /// there is no fixed device memory to plan against (the CPU).
    fn total_memory(&self) -> Option<usize> {
        None
    }
    /// How buffers count towards [`Device::peak_memory`] (see [`Accounting`]).
    fn accounting(&self) -> Accounting {
        Accounting::default()
    }
    /// Most bytes reserved from the device at once, cached free blocks included (like
    /// `torch.cuda.max_memory_reserved`); backends without a cache report [`Device::peak_memory`].
    fn peak_reserved_memory(&self) -> usize {
        self.peak_memory()
    }
    /// Gives the free blocks a caching allocator holds back to the device (after the queued
    /// work finishes). The model calls it when its activations grow: the old, smaller blocks
    /// would otherwise stay reserved, as no larger request can use them. A no-op by default.
    fn release_cached(&self) -> Result<()> {
        Ok(())
    }
    /// Records a timestamp in the device's queue (an event on CUDA; the host clock on the CPU,
    /// whose ops run synchronously), for profiling without synchronising.
    fn timestamp(&self) -> Result<()>;
    /// Waits for the queued work, then returns the seconds between consecutive timestamps
    /// recorded since the last call (one fewer than there were) and forgets them.
    fn take_timestamps(&self) -> Result<Vec<f64>>;
}
