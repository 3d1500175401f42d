//! Device memory: a caching allocator with size-bucketed free lists, the owned buffer type and
//! the borrowed views the [`crate::Backend`] trait hands around.
//!
//! Blocks are never returned to the driver while the backend lives (except to retry an
//! allocation that ran out of memory), so a training step that repeats the shapes of the previous
//! one never calls `cuMemAlloc`. A request may take a free block up to 1.5× its size: packed
//! batches change size every step, and without that slack every new size would reserve a new
//! block while the old ones sit idle. All work runs on one stream, so a block freed on the host
//! can be handed to the next allocation at once: the stream orders the old and the new use.
//!
//! Two peaks are kept: bytes requested by live buffers, each rounded up to 512 bytes (what
//! `torch.cuda.max_memory_allocated` reports, and what [`crate::Backend::peak_memory`] returns),
//! and bytes reserved from the driver (whole blocks, live plus cached, like
//! `max_memory_reserved`).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{result as cu, CudaContext};

use crate::{BackendError, Result};

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// bfloat16 (stored as 16 bits).
    Bf16,
    /// IEEE single precision.
    F32,
    /// 32-bit signed integers (token ids, positions, `cu_seqlens`).
    I32,
    /// Raw 16-bit words: the low halves of fp32 master weights whose high halves are the bf16
    /// parameters (see `adamw.rs`). No kernel reads them as numbers except AdamW.
    U16,
    /// Bytes: the codes of 8-bit optimizer states (`Kind::Code8`).
    U8,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::Bf16 | Dtype::U16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
        }
    }
    /// Suffix of kernel entry points compiled for this element type.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::I32 => "i32",
            Dtype::U16 => "u16",
            Dtype::U8 => "u8",
        }
    }
}

/// What a request counts towards the live peak: its size rounded up to 512 bytes, as PyTorch's
/// caching allocator counts `max_memory_allocated` (not the size of the block that serves it).
fn live_bytes(bytes: usize) -> usize {
    bytes.max(1).div_ceil(LIVE_ROUND) * LIVE_ROUND
}

/// The unit [`live_bytes`] rounds to (`Accounting::round`).
pub(crate) const LIVE_ROUND: usize = 512;

/// Size class of a request: 16 classes per power of two, so at most 1/8 of a request is padding
/// (above 8 KiB).
fn bucket(bytes: usize) -> usize {
    let bytes = bytes.max(512);
    let p = bytes.next_power_of_two();
    let step = (p / 16).max(512);
    bytes.div_ceil(step) * step
}

/// Free lists and counters of the caching allocator.
pub(crate) struct Pool {
    ctx: Arc<CudaContext>,
    free: BTreeMap<usize, Vec<CUdeviceptr>>,
    /// Bytes obtained from the driver and not yet given back.
    reserved: usize,
    peak_reserved: usize,
    /// Bytes requested by live buffers (see [`live_bytes`]).
    live: usize,
    peak_live: usize,
}

impl Pool {
    pub(crate) fn new(ctx: Arc<CudaContext>) -> Self {
        Pool {
            ctx,
            free: BTreeMap::new(),
            reserved: 0,
            peak_reserved: 0,
            live: 0,
            peak_live: 0,
        }
    }

    /// Most bytes ever held by live buffers.
    pub(crate) fn peak(&self) -> usize {
        self.peak_live
    }

    /// Most bytes ever reserved from the driver (live plus cached).
    pub(crate) fn peak_reserved(&self) -> usize {
        self.peak_reserved
    }

    fn take(&mut self, bytes: usize) -> Result<(CUdeviceptr, usize)> {
        let (ptr, size) = self.take_block(bytes)?;
        self.live += live_bytes(bytes);
        self.peak_live = self.peak_live.max(self.live);
        Ok((ptr, size))
    }

    fn take_block(&mut self, bytes: usize) -> Result<(CUdeviceptr, usize)> {
        let size = bucket(bytes);
        // The smallest cached block that fits with at most 50% slack.
        let fit = self
            .free
            .range_mut(size..=size + size / 2)
            .find_map(|(&s, ptrs)| ptrs.pop().map(|p| (p, s)));
        if let Some(hit) = fit {
            return Ok(hit);
        }
        let dev = |e: cu::DriverError| BackendError::Device {
            op: format!("cuMemAlloc({size} bytes)"),
            msg: e.to_string(),
        };
        self.ctx.bind_to_thread().map_err(dev)?;
        // SAFETY: a plain device allocation of `size` bytes in the bound context.
        let ptr = match unsafe { cu::malloc_sync(size) } {
            Ok(p) => p,
            Err(_) => {
                // Out of memory (or fragmented): give the cached blocks back and try once more.
                self.ctx.synchronize().map_err(dev)?;
                self.release_cached().map_err(dev)?;
                // SAFETY: as above.
                match unsafe { cu::malloc_sync(size) } {
                    Ok(p) => p,
                    Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                        let (free, total) = cu::mem_get_info().unwrap_or((0, 0));
                        return Err(BackendError::OutOfMemory {
                            what: format!("a buffer of {size} bytes"),
                            requested: size,
                            held: self.reserved,
                            free,
                            total,
                        });
                    }
                    Err(e) => {
                        return Err(BackendError::Device {
                            op: format!("cuMemAlloc({size} bytes, {} bytes held)", self.reserved),
                            msg: e.to_string(),
                        })
                    }
                }
            }
        };
        self.reserved += size;
        self.peak_reserved = self.peak_reserved.max(self.reserved);
        Ok((ptr, size))
    }

    fn give(&mut self, ptr: CUdeviceptr, size: usize, bytes: usize) {
        self.live -= live_bytes(bytes);
        self.free.entry(size).or_default().push(ptr);
    }

    /// Waits for the stream's work, then gives every cached block back to the driver.
    pub(crate) fn trim(&mut self) -> Result<()> {
        let dev = |e: cu::DriverError| BackendError::Device {
            op: "release cached blocks".into(),
            msg: e.to_string(),
        };
        self.ctx.bind_to_thread().map_err(dev)?;
        self.ctx.synchronize().map_err(dev)?;
        self.release_cached().map_err(dev)
    }

    fn release_cached(&mut self) -> std::result::Result<(), cu::DriverError> {
        for (size, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                // SAFETY: `p` came from `malloc_sync` and is on no free list any more.
                unsafe { cu::free_sync(p) }?;
                self.reserved -= size;
            }
        }
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Every buffer holds the pool, so this runs after the last buffer is gone. Errors at
        // teardown have nobody left to report to.
        if self.ctx.bind_to_thread().is_ok() && self.ctx.synchronize().is_ok() {
            let _ = self.release_cached();
        }
    }
}

/// An owned device buffer of `len` elements of one [`Dtype`]; its block returns to the
/// backend's pool when dropped (for a part of a shared allocation, when the last part is).
pub struct CudaBuf {
    pub(crate) ptr: CUdeviceptr,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    owner: Owner,
}

/// Who gives a buffer's memory back.
enum Owner {
    /// A block of the pool, returned on drop.
    Block {
        block: usize,
        pool: Arc<Mutex<Pool>>,
    },
    /// Part of a shared allocation (`Backend::alloc_parts`), kept alive by every part (the
    /// field is held only for its `Drop`).
    Part(#[allow(dead_code)] Arc<CudaBuf>),
}

impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBuf({:?}[{}] @ {:#x})",
            self.dtype, self.len, self.ptr
        )
    }
}

impl CudaBuf {
    /// An uninitialised buffer from the pool (callers fill it before any kernel reads it).
    pub(crate) fn uninit(pool: &Arc<Mutex<Pool>>, len: usize, dtype: Dtype) -> Result<Self> {
        let (ptr, block) = pool
            .lock()
            .expect("pool mutex poisoned by a panic in another thread")
            .take(len * dtype.size())?;
        Ok(CudaBuf {
            ptr,
            len,
            dtype,
            owner: Owner::Block {
                block,
                pool: pool.clone(),
            },
        })
    }
    /// `len` elements of `dtype` at `byte_offset` into a shared allocation; the caller checked
    /// that they lie inside it.
    pub(crate) fn part(base: &Arc<CudaBuf>, byte_offset: usize, len: usize, dtype: Dtype) -> Self {
        CudaBuf {
            ptr: base.ptr + byte_offset as u64,
            len,
            dtype,
            owner: Owner::Part(base.clone()),
        }
    }
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// A view of the whole buffer.
    pub fn as_ref(&self) -> CudaRef<'_> {
        CudaRef::raw(self.ptr, self.len, self.dtype)
    }
    /// A writable view of the whole buffer.
    pub fn as_mut(&mut self) -> CudaMut<'_> {
        CudaMut::raw(self.ptr, self.len, self.dtype)
    }
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if let Owner::Block { block, pool } = &self.owner {
            if let Ok(mut pool) = pool.lock() {
                pool.give(self.ptr, *block, self.len * self.dtype.size());
            }
        }
    }
}

/// A read-only view of `len` elements of a device buffer.
#[derive(Clone, Copy, Debug)]
pub struct CudaRef<'a> {
    pub(crate) ptr: CUdeviceptr,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a CudaBuf>,
}

/// A writable view of `len` elements of a device buffer.
#[derive(Debug)]
pub struct CudaMut<'a> {
    pub(crate) ptr: CUdeviceptr,
    pub(crate) len: usize,
    pub(crate) dtype: Dtype,
    _buf: PhantomData<&'a mut CudaBuf>,
}

/// The constructor and accessors both views share.
macro_rules! view_accessors {
    ($($view:ident),*) => {$(
        impl $view<'_> {
            /// A view of `len` elements at `ptr`; the caller checked that they lie in a live
            /// buffer of type `dtype` and chose the lifetime.
            pub(crate) fn raw(ptr: CUdeviceptr, len: usize, dtype: Dtype) -> Self {
                $view {
                    ptr,
                    len,
                    dtype,
                    _buf: PhantomData,
                }
            }
            /// Element type.
            pub fn dtype(&self) -> Dtype {
                self.dtype
            }
            /// Number of elements.
            pub fn len(&self) -> usize {
                self.len
            }
            /// Whether the view is empty.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }
        }
        impl ViewInfo for $view<'_> {
            fn len_(&self) -> usize {
                self.len
            }
            fn dtype_(&self) -> Dtype {
                self.dtype
            }
        }
    )*};
}
view_accessors!(CudaRef, CudaMut);

impl<'a> CudaMut<'a> {
    /// The same view with a lifetime chosen by the caller (for splitting one buffer into
    /// disjoint views; the caller guarantees the views do not overlap and do not outlive it).
    pub(crate) fn detach<'b>(self) -> CudaMut<'b> {
        CudaMut::raw(self.ptr, self.len, self.dtype)
    }
    /// Reborrows the view for a shorter time.
    pub fn reborrow(&mut self) -> CudaMut<'_> {
        CudaMut::raw(self.ptr, self.len, self.dtype)
    }
    /// Reborrows the view as read-only.
    pub fn as_ref(&self) -> CudaRef<'_> {
        CudaRef::raw(self.ptr, self.len, self.dtype)
    }
}

/// Length and element type of either view kind, for shape checks.
pub(crate) trait ViewInfo {
    fn len_(&self) -> usize;
    fn dtype_(&self) -> Dtype;
}

/// Views of a sub-range; the range was checked against the buffer by the caller.
pub(crate) fn sub_ref(buf: &CudaBuf, start: usize, len: usize) -> CudaRef<'_> {
    CudaRef::raw(buf.ptr + (start * buf.dtype.size()) as u64, len, buf.dtype)
}

pub(crate) fn sub_mut(buf: &mut CudaBuf, start: usize, len: usize) -> CudaMut<'_> {
    CudaMut::raw(buf.ptr + (start * buf.dtype.size()) as u64, len, buf.dtype)
}

/// An `i32` array on the device together with the host copy it was uploaded from, so that
/// launchers can build tile lists and compact rows without reading the device.
#[derive(Debug)]
pub struct CudaInts {
    pub(crate) dev: CudaBuf,
    pub(crate) host: Vec<i32>,
}

impl CudaInts {
    /// The host copy.
    pub fn host(&self) -> &[i32] {
        &self.host
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_cover_the_request_and_waste_little() {
        for bytes in [
            1,
            511,
            512,
            513,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let b = bucket(bytes);
            assert!(b >= bytes, "{bytes} -> {b}");
            assert!(
                b <= (bytes.max(512) * 9).div_ceil(8) + 512,
                "{bytes} -> {b}"
            );
            assert_eq!(bucket(b), b, "bucket of a bucket size is itself");
        }
    }
}
