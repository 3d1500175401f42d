//! [`Staging`] on CUDA: page-locked host memory (`cuMemHostAlloc`, not write-combined: the
//! host reads the gradients back) with a copy stream and the event of its last copy per
//! buffer. A copy waits for the compute stream through an event; the compute stream waits for a
//! device-to-host copy at once (its source, the gradient scratch, is overwritten next), except an
//! unfenced one (offloaded activations, whose buffer only a later layer reuses), and for a
//! host-to-device copy only at [`Staging::host_fence`]. Two buffers used in opposite directions
//! have two streams, so gradients going down and weights going up share PCIe both ways.
//!
//! The pool's rule that all work runs on one stream (module `memory`) still holds for what is
//! freed: the copies touch only the parameters and the gradient scratch, which live through the
//! step, and the step fences every copy before it ends.

use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::driver::{result as cu, CudaEvent, CudaStream, PinnedHostSlice};

use super::adamw::split_master;
use super::{Cuda, CudaMut, CudaRef, Dtype};
use crate::error::check;
use crate::{BackendError, Kind, Result, Staging};

/// A page-locked host buffer of `len` elements of one [`Dtype`] and its copy stream.
pub struct CudaHost {
    mem: PinnedHostSlice<u8>,
    len: usize,
    dtype: Dtype,
    stream: Arc<CudaStream>,
    /// The last copy queued on `stream` (none yet: nothing to wait for).
    done: Option<CudaEvent>,
}

impl std::fmt::Debug for CudaHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaHost({:?}[{}])", self.dtype, self.len)
    }
}

impl CudaHost {
    /// Waits for the last copy, then the bytes (the pinned slice's own event is never recorded:
    /// copies are ordered by `done`).
    fn bytes(&mut self) -> std::result::Result<&mut [u8], cu::DriverError> {
        if let Some(e) = &self.done {
            e.synchronize()?;
        }
        self.mem.as_mut_slice()
    }
}

impl Cuda {
    /// Queues a copy of a view of `len` elements of `dtype` (checked against the host buffer)
    /// on the host buffer's stream after the compute stream's work so far, and records it as
    /// the buffer's last copy. `copy` gets the view's bytes of the host buffer.
    fn host_copy(
        &self,
        op: &'static str,
        host: &mut CudaHost,
        (len, dtype): (usize, Dtype),
        copy: impl FnOnce(&mut [u8], CUstream) -> std::result::Result<(), cu::DriverError>,
    ) -> Result<()> {
        check(host.dtype == dtype && len <= host.len, op, || {
            format!(
                "{len} x {dtype:?} with a host buffer of {} x {:?}",
                host.len, host.dtype
            )
        })?;
        if len == 0 {
            return Ok(());
        }
        let err = self.device_err(op);
        self.ctx.bind_to_thread().map_err(&err)?;
        host.stream.join(&self.stream).map_err(&err)?;
        let stream = host.stream.clone();
        let bytes = host.bytes().map_err(&err)?;
        copy(&mut bytes[..len * dtype.size()], stream.cu_stream()).map_err(&err)?;
        host.done = Some(stream.record_event(None).map_err(&err)?);
        Ok(())
    }
}

impl Staging for Cuda {
    type Host = CudaHost;

    fn host_alloc(&self, len: usize, kind: Kind) -> Result<CudaHost> {
        let dtype = self.dtype_of(kind);
        let err = self.device_err("host_alloc (cuMemHostAlloc)");
        let bytes = len * dtype.size();
        // SAFETY: the memory is zeroed below before anything reads it.
        let mut mem = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }.map_err(
            |e| match e.0 {
                cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                    BackendError::Unsupported(format!(
                        "cannot pin {bytes} bytes of host memory (offloaded optimizer or activations)"
                    ))
                }
                _ => err(e),
            },
        )?;
        mem.as_mut_slice().map_err(&err)?.fill(0);
        let stream = self.ctx.new_stream().map_err(&err)?;
        Ok(CudaHost {
            mem,
            len,
            dtype,
            stream,
            done: None,
        })
    }

    fn host_len(&self, host: &CudaHost) -> usize {
        host.len
    }

    fn copy_to_host(&self, src: CudaRef<'_>, host: &mut CudaHost) -> Result<()> {
        let op = "copy_to_host (cuMemcpyDtoHAsync)";
        // SAFETY: `src` is a live buffer's view of the bytes' length; the host reads the bytes
        // only after `done` (host_read).
        self.host_copy(op, host, (src.len, src.dtype), |bytes, s| unsafe {
            cu::memcpy_dtoh_async(bytes, src.ptr, s)
        })?;
        // The source may be overwritten by the compute stream's next work.
        self.host_fence(host)
    }

    fn copy_to_host_unfenced(&self, src: CudaRef<'_>, host: &mut CudaHost) -> Result<()> {
        let op = "copy_to_host_unfenced (cuMemcpyDtoHAsync)";
        // SAFETY: as copy_to_host; the caller fences before the compute stream overwrites `src`.
        self.host_copy(op, host, (src.len, src.dtype), |bytes, s| unsafe {
            cu::memcpy_dtoh_async(bytes, src.ptr, s)
        })
    }

    fn copy_from_host(&self, host: &mut CudaHost, dst: CudaMut<'_>) -> Result<()> {
        let op = "copy_from_host (cuMemcpyHtoDAsync)";
        // SAFETY: `dst` has room for the bytes; the host writes them again only after `done`
        // (host_write), and the compute stream reads `dst` only after `host_fence`.
        self.host_copy(op, host, (dst.len, dst.dtype), |bytes, s| unsafe {
            cu::memcpy_htod_async(dst.ptr, bytes, s)
        })
    }

    fn host_fence(&self, host: &CudaHost) -> Result<()> {
        match &host.done {
            Some(e) => self
                .stream
                .wait(e)
                .map_err(self.device_err("host_fence (cuStreamWaitEvent)")),
            None => Ok(()),
        }
    }

    fn host_read(&self, host: &CudaHost, out: &mut [f32]) -> Result<()> {
        check(out.len() <= host.len, "host_read", || {
            format!("{} values from a host buffer of {}", out.len(), host.len)
        })?;
        let err = self.device_err("host_read (cuEventSynchronize)");
        if let Some(e) = &host.done {
            e.synchronize().map_err(&err)?;
        }
        let bytes = host.mem.as_slice().map_err(&err)?;
        match host.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_ne_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            d => {
                return Err(BackendError::Unsupported(format!(
                    "host_read: {d:?} host buffers hold no f32 values"
                )))
            }
        }
        Ok(())
    }

    fn host_write(&self, host: &mut CudaHost, vals: &[f32]) -> Result<()> {
        check(vals.len() <= host.len, "host_write", || {
            format!("{} values into a host buffer of {}", vals.len(), host.len)
        })?;
        let dtype = host.dtype;
        let bytes = host
            .bytes()
            .map_err(self.device_err("host_write (cuEventSynchronize)"))?;
        match dtype {
            Dtype::F32 => {
                for (c, &x) in bytes.chunks_exact_mut(4).zip(vals) {
                    c.copy_from_slice(&x.to_ne_bytes());
                }
            }
            // The high half of the split master weight: what `adamw.cu` leaves in a bf16
            // parameter.
            Dtype::Bf16 => {
                for (c, &x) in bytes.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&split_master(x).0.to_ne_bytes());
                }
            }
            d => {
                return Err(BackendError::Unsupported(format!(
                    "host_write: {d:?} host buffers hold no weights"
                )))
            }
        }
        Ok(())
    }
}
