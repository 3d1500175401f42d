//! NCCL over the CUDA backend: a communicator on the backend's stream ([`NcclComm`]) and the
//! collectives data parallelism needs on device buffers (all-reduce, reduce-scatter, all-gather,
//! in place) and on host scalars, with failure detection, so that no rank hangs silently.
//!
//! Setup: rank 0 makes an [`NcclId`] and hands its 128 bytes to the other ranks (nopad-train does
//! that over its TCP rendezvous); every rank then calls [`NcclComm::new`] with it. The
//! communicator is created **non-blocking** (`ncclCommInitRankConfig` with `blocking = 0`) and
//! its setup is polled with `ncclCommGetAsyncError` against a deadline, so a rank that never
//! joins is an error after the timeout, not a hang.
//!
//! Failure: each collective is bracketed by events on the stream and watched by a thread
//! (`watchdog.rs`). A collective still running [`NcclOptions::timeout`] after the stream reached
//! it, or an error NCCL reports asynchronously, aborts the communicator (`ncclCommAbort`, which
//! also ends NCCL's kernels waiting for a dead peer) and becomes the error of every later call,
//! naming the rank, the collective and its size. The watchdog also prints that line at once, as
//! the thread that will return it may be blocked on the stream until the abort frees it.
//!
//! Element types: sums run in the buffer's own type (f32, bf16, i32, and f64 for host values);
//! summing u16 words or u8 codes is refused. All-gather only copies, so it moves any buffer as
//! bytes. Reduce-scatter and all-gather use the shards of [`shard`] (equal, the last shorter);
//! when `n` does not divide by the world size they go through a padded scratch buffer, since
//! NCCL's shards are equal.
//!
//! Streams: collectives run on a stream of their own, each after everything the backend's
//! compute stream had enqueued when it was called (an event the communication stream waits on),
//! so a collective always sees the kernels that filled its buffer. Afterwards the compute stream
//! waits for it (an event the other way, no host wait) before its next kernel: the order of one
//! stream, unless the caller asks for a **deferred** collective ([`NcclComm::all_reduce_deferred`],
//! [`NcclComm::reduce_scatter_deferred`]), which the compute stream does not wait for until
//! [`NcclComm::settle`]. That is how the exchange of one group's gradients runs while the
//! backward of the next group computes; until `settle` the caller must neither write nor free
//! the buffer. A collective that pads through a scratch buffer settles before the scratch goes
//! back to the pool (the pool hands memory out in the compute stream's order).
//!
//! The library is opened at run time: `libnccl.so.2`, found through `LD_LIBRARY_PATH`; a
//! missing one is [`BackendError::Unavailable`] saying so.
//!
//! Module map: `library` (loading libnccl, result codes), `setup` ([`NcclId`], the non-blocking
//! configuration), `watchdog` (the state shared with the watchdog thread, timeouts and abort),
//! and here the communicator and its collectives.

mod library;
mod setup;
mod watchdog;

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::result as cu;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::sys::{ncclDataType_t, ncclRedOp_t};

use super::{Cuda, CudaBuf, CudaMut, Dtype};
use crate::{BackendError, Result};
use library::{library, Library, Stream, IN_PROGRESS, SUCCESS};
use setup::config;
pub use setup::{NcclId, NCCL_ID_BYTES};
use watchdog::Shared;

/// The NCCL library's version ("2.21.5") and file, or why it cannot be loaded.
pub fn nccl_version() -> Result<String> {
    let lib = library()?;
    Ok(format!(
        "NCCL {} ({})",
        library::version_string(lib.version),
        lib.name
    ))
}

/// How a communicator is set up and watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NcclOptions {
    /// How long the setup, and each collective once the stream has reached it, may take before
    /// the communicator is aborted and the call fails.
    pub timeout: Duration,
}

impl Default for NcclOptions {
    fn default() -> Self {
        NcclOptions {
            timeout: Duration::from_secs(60),
        }
    }
}

/// The part of `0..n` that `rank` of `world_size` owns in reduce-scatter and all-gather: equal
/// shards of `ceil(n / world_size)`, the last ones shorter (possibly empty).
pub fn shard(n: usize, rank: usize, world_size: usize) -> Range<usize> {
    let per = n.div_ceil(world_size.max(1));
    let start = (rank * per).min(n);
    start..(start + per).min(n)
}

/// What a collective does with its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Sums them (all-reduce, reduce-scatter).
    Sum,
    /// Copies them (all-gather).
    Copy,
}

/// NCCL's element type for `dtype` under `op` and the elements per buffer element: sums run in
/// the buffer's type, copies move bytes. Summing raw words or codes is refused.
fn nccl_type(op_name: &'static str, dtype: Dtype, op: Op) -> Result<(ncclDataType_t, usize)> {
    use ncclDataType_t as T;
    match (op, dtype) {
        (Op::Copy, d) => Ok((T::ncclUint8, d.size())),
        (Op::Sum, Dtype::F32) => Ok((T::ncclFloat32, 1)),
        (Op::Sum, Dtype::Bf16) => Ok((T::ncclBfloat16, 1)),
        (Op::Sum, Dtype::I32) => Ok((T::ncclInt32, 1)),
        (Op::Sum, d @ (Dtype::U16 | Dtype::U8)) => Err(BackendError::Unsupported(format!(
            "{op_name}: {d:?} buffers hold raw words or codes, not numbers to sum"
        ))),
    }
}

/// Checks that a view holds the `n` elements a collective was asked to work on.
fn check_len(op: &'static str, buf: &CudaMut<'_>, n: usize) -> Result<()> {
    crate::error::check(buf.len >= n, op, || {
        format!("buffer has {} elements, the collective covers {n}", buf.len)
    })
}

/// A buffer's element type and byte count in messages: "1000 Bf16 elements (2000 bytes)".
fn size_words(n: usize, dtype: Dtype) -> String {
    format!("{n} {dtype:?} elements ({} bytes)", n * dtype.size())
}

/// One rank's NCCL communicator over a [`Cuda`] backend. Every rank calls the same collectives
/// in the same order; each is enqueued on the communicator's stream after the backend's kernels
/// enqueued so far and returns without the host waiting, except
/// [`NcclComm::all_reduce_host`] and [`NcclComm::wait`] (the module doc says how the two
/// streams are ordered).
pub struct NcclComm {
    shared: Arc<Shared>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    rank: usize,
    world_size: usize,
    ctx: Arc<CudaContext>,
    /// The backend's compute stream.
    stream: Arc<CudaStream>,
    /// The stream every collective runs on.
    comm: Arc<CudaStream>,
    /// [`HOST_SLOTS`] f64 on the device, for host sums.
    host: Mutex<CudaBuf>,
}

/// Whether the compute stream waits for a collective before its next kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Yes: the collective is ordered as if it ran on the compute stream.
    InStream,
    /// Not until [`NcclComm::settle`].
    Deferred,
}

/// Host values summed per NCCL call by [`NcclComm::all_reduce_host`] (a step sums two or three).
pub const HOST_SLOTS: usize = 64;

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world_size` on `cuda`'s device and stream.
    /// Every rank must call it with the same id and world size; it returns once all have joined,
    /// or fails after `opts.timeout` naming the rank.
    pub fn new(
        cuda: &Cuda,
        id: &NcclId,
        rank: usize,
        world_size: usize,
        opts: &NcclOptions,
    ) -> Result<NcclComm> {
        let lib = library()?;
        let host = Mutex::new(cuda.scratch(HOST_SLOTS * 8, Dtype::U8)?);
        if rank >= world_size || i32::try_from(world_size).is_err() {
            return Err(BackendError::Unsupported(format!(
                "NCCL: rank {rank} of a world of {world_size}"
            )));
        }
        let what = format!(
            "NCCL setup (rank {rank} of {world_size}, {})",
            cuda.description
        );
        cuda.ctx
            .bind_to_thread()
            .map_err(cuda.device_err("NCCL setup"))?;
        let mut comm = std::ptr::null_mut();
        let mut cfg = config();
        // SAFETY: `comm` and `cfg` outlive the call (NCCL copies the config); the id is passed
        // by value. The backend's context is current, so NCCL binds its device.
        let code = unsafe {
            (lib.init_rank_config)(
                &mut comm,
                world_size as i32,
                id.raw(),
                rank as i32,
                &mut cfg,
            )
        };
        if code != SUCCESS && code != IN_PROGRESS {
            let msg = lib.describe(code, comm);
            if !comm.is_null() {
                // SAFETY: the handle NCCL returned, never used again.
                let _ = unsafe { (lib.abort)(comm) };
            }
            return Err(BackendError::Device { op: what, msg });
        }
        let shared = Arc::new(Shared::new(lib, comm, rank, opts.timeout));
        shared.settle(&what).map_err(|msg| BackendError::Device {
            op: "ncclCommInitRankConfig".into(),
            msg,
        })?;
        let watchdog = watchdog::spawn(shared.clone(), cuda.ctx.clone()).map_err(|e| {
            shared.fail(format!("rank {rank}: cannot start the NCCL watchdog: {e}"));
            BackendError::Device {
                op: "NCCL watchdog thread".into(),
                msg: e.to_string(),
            }
        })?;
        let comm = cuda
            .ctx
            .new_stream()
            .map_err(cuda.device_err("NCCL (cuStreamCreate)"))?;
        Ok(NcclComm {
            shared,
            watchdog: Some(watchdog),
            rank,
            world_size,
            ctx: cuda.ctx.clone(),
            stream: cuda.stream.clone(),
            comm,
            host,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Changes the timeout of collectives from now on, running ones included: for a stretch
    /// where ranks legitimately wait for each other longer (every rank waits for rank 0 while
    /// it writes a checkpoint); every rank should change it at the same point.
    pub fn set_timeout(&self, timeout: Duration) {
        self.shared.set_timeout(timeout);
    }

    /// The timeout of collectives now.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout()
    }

    /// The first failure so far (a collective that timed out, an error NCCL reported), if any.
    pub fn check(&self) -> Result<()> {
        match self.shared.failure() {
            None => Ok(()),
            Some(msg) => Err(failed(msg)),
        }
    }

    /// Records `why` as this rank's failure and aborts the communicator, so that peers waiting
    /// in a collective for this rank fail at once instead of at their timeout.
    pub fn abort(&self, why: &str) {
        self.shared.fail(format!("rank {}: {why}", self.rank));
    }

    /// Sums the first `n` elements of `buf` over the ranks, in place.
    pub fn all_reduce(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        self.summed(cuda, buf, n, Order::InStream)
    }

    /// [`NcclComm::all_reduce`], which the compute stream does not wait for until
    /// [`NcclComm::settle`]: `buf` must not be written or freed before then.
    pub fn all_reduce_deferred(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        self.summed(cuda, buf, n, Order::Deferred)
    }

    /// Sums the first `n` elements of `buf` over the ranks and leaves this rank's [`shard`] of
    /// the sum in place; the rest of `buf[..n]` is undefined afterwards.
    pub fn reduce_scatter(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        self.sharded(cuda, "reduce_scatter", buf, n, Op::Sum, Order::InStream)
    }

    /// [`NcclComm::reduce_scatter`], which the compute stream does not wait for until
    /// [`NcclComm::settle`]: `buf` must not be written or freed before then.
    pub fn reduce_scatter_deferred(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        self.sharded(cuda, "reduce_scatter", buf, n, Op::Sum, Order::Deferred)
    }

    /// Fills the first `n` elements of `buf` from the ranks' shards ([`shard`]), each rank's
    /// shard read from that rank's `buf`.
    pub fn all_gather(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize) -> Result<()> {
        self.sharded(cuda, "all_gather", buf, n, Op::Copy, Order::InStream)
    }

    /// Makes the compute stream wait for every collective issued so far (deferred ones
    /// included) before its next kernel. The host does not wait.
    pub fn settle(&self) -> Result<()> {
        self.check()?;
        self.bind()?;
        self.stream
            .join(&self.comm)
            .map_err(|e| device("NCCL settle (cuStreamWaitEvent)", e))
    }

    /// Makes the communication stream wait for everything the compute stream has enqueued (the
    /// kernels that filled the buffers a collective is about to read).
    fn follow_compute(&self) -> Result<()> {
        self.bind()?;
        self.comm
            .join(&self.stream)
            .map_err(|e| device("NCCL (cuStreamWaitEvent)", e))
    }

    /// Settles unless the collective was asked `Deferred`.
    fn finish(&self, order: Order) -> Result<()> {
        match order {
            Order::InStream => self.settle(),
            Order::Deferred => Ok(()),
        }
    }

    /// All-reduce (sum) of `buf[..n]` in place.
    fn summed(&self, cuda: &Cuda, buf: CudaMut<'_>, n: usize, order: Order) -> Result<()> {
        const OP: &str = "all_reduce";
        let Some((ty, per_elem)) = self.prepare(cuda, OP, &buf, n, Op::Sum)? else {
            return Ok(());
        };
        let ptr = buf.ptr;
        let what = format!("{OP} of {}", size_words(n, buf.dtype));
        self.follow_compute()?;
        self.enqueue(what, |lib, comm, s| {
            // SAFETY: `ptr` holds `n` elements (checked); in place is allowed.
            unsafe { (lib.all_reduce)(dptr(ptr), dptr(ptr), n * per_elem, ty as u32, SUM, comm, s) }
        })?;
        self.finish(order)
    }

    /// The checks every device collective starts with: NCCL's element type and elements per
    /// buffer element, or `None` when there is nothing to do.
    fn prepare(
        &self,
        cuda: &Cuda,
        op: &'static str,
        buf: &CudaMut<'_>,
        n: usize,
        kind: Op,
    ) -> Result<Option<(ncclDataType_t, usize)>> {
        self.same_backend(cuda, op)?;
        let ty = nccl_type(op, buf.dtype, kind)?;
        check_len(op, buf, n)?;
        Ok((n > 0).then_some(ty))
    }

    /// Reduce-scatter (`Op::Sum`) or all-gather (`Op::Copy`) of `buf[..n]` over the shards of
    /// [`shard`]: in place when `n` divides by the world size (each rank's shard is its slot of
    /// the buffer, NCCL's in-place form), else through a copy padded to equal slots.
    fn sharded(
        &self,
        cuda: &Cuda,
        op: &'static str,
        buf: CudaMut<'_>,
        n: usize,
        kind: Op,
        order: Order,
    ) -> Result<()> {
        let Some((ty, per_elem)) = self.prepare(cuda, op, &buf, n, kind)? else {
            return Ok(());
        };
        self.follow_compute()?;
        let (w, dtype, size) = (self.world_size, buf.dtype, buf.dtype.size());
        let per = n.div_ceil(w);
        let what = format!("{op} of {}", size_words(n, dtype));
        let slot = (self.rank * per * size) as u64;
        let call = |base: CUdeviceptr| {
            move |lib: &Library, comm, s| {
                let (all, mine) = (dptr(base), dptr(base + slot));
                // SAFETY: `base` holds `per * w` elements and `mine` is this rank's slot.
                unsafe {
                    match kind {
                        Op::Sum => (lib.reduce_scatter)(all, mine, per, ty as u32, SUM, comm, s),
                        Op::Copy => (lib.all_gather)(mine, all, per * per_elem, ty as u32, comm, s),
                    }
                }
            }
        };
        if per * w == n {
            self.enqueue(what, call(buf.ptr))?;
            return self.finish(order);
        }
        let mut padded = cuda.scratch(per * w, dtype)?;
        let mine = shard(n, self.rank, w);
        let (off, len) = ((mine.start * size) as u64, mine.len() * size);
        match kind {
            // The sum reads every slot: all of `buf[..n]`, zeros after it.
            Op::Sum => {
                self.copy(buf.ptr, padded.ptr, n * size, "reduce_scatter (padding)")?;
                self.zero_tail(&mut padded, n)?;
            }
            // The gather reads only this rank's slot.
            Op::Copy => self.copy(buf.ptr + off, padded.ptr + off, len, "all_gather (shard)")?,
        }
        self.enqueue(what, call(padded.ptr))?;
        match kind {
            Op::Sum => self.copy(
                padded.ptr + off,
                buf.ptr + off,
                len,
                "reduce_scatter (shard)",
            )?,
            Op::Copy => self.copy(padded.ptr, buf.ptr, n * size, "all_gather (result)")?,
        }
        // `padded` goes back to the pool, which hands memory out in the compute stream's order:
        // that stream must be past the collective first, deferred or not.
        self.settle()
    }

    /// Sums `vals` over the ranks, in place, through a small device buffer of the
    /// communicator's (in chunks of [`HOST_SLOTS`] values); waits for the result, with the
    /// watchdog's timeout.
    pub fn all_reduce_host(&self, vals: &mut [f64]) -> Result<()> {
        let dev = self.host.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.comm.cu_stream();
        for chunk in vals.chunks_mut(HOST_SLOTS) {
            let n = chunk.len();
            self.bind()?;
            // SAFETY: `dev` holds HOST_SLOTS f64; a pageable source is staged before the call
            // returns.
            unsafe { cu::memcpy_htod_async(dev.ptr, chunk, s) }
                .map_err(|e| device("NCCL all_reduce_host (cuMemcpyHtoDAsync)", e))?;
            let (ptr, ty) = (dev.ptr, ncclDataType_t::ncclFloat64 as u32);
            self.enqueue(format!("all_reduce of {n} host values"), |lib, comm, s| {
                // SAFETY: `ptr` holds at least `n` f64; in place.
                unsafe { (lib.all_reduce)(dptr(ptr), dptr(ptr), n, ty, SUM, comm, s) }
            })?;
            self.wait()?;
            // SAFETY: the sum is complete (waited above); the stream is synchronised before
            // `chunk` is read.
            unsafe {
                cu::memcpy_dtoh_async(chunk, dev.ptr, s)
                    .and_then(|()| cu::stream::synchronize(s))
                    .map_err(|e| device("NCCL all_reduce_host (cuMemcpyDtoHAsync)", e))?;
            }
        }
        Ok(())
    }

    /// Refuses a backend other than the one the communicator was made on (its stream orders
    /// the collectives with the kernels that fill the buffers).
    fn same_backend(&self, cuda: &Cuda, op: &str) -> Result<()> {
        if Arc::ptr_eq(&cuda.stream, &self.stream) {
            Ok(())
        } else {
            Err(BackendError::Unsupported(format!(
                "NCCL {op}: the communicator belongs to another CUDA backend"
            )))
        }
    }

    /// Waits until every collective enqueued so far has completed, or fails with the failure
    /// the watchdog recorded (a timeout, an NCCL error).
    pub fn wait(&self) -> Result<()> {
        self.check()?;
        self.bind()?;
        let done = self
            .comm
            .record_event(None)
            .map_err(|e| device("NCCL wait (cuEventRecord)", e))?;
        loop {
            match done.try_is_complete() {
                Ok(true) => return self.check(),
                Ok(false) => {}
                Err(e) => return Err(device("NCCL wait (cuEventQuery)", e)),
            }
            self.check()?;
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| device("NCCL (binding the context)", e))
    }

    /// Enqueues one collective on the stream between two events the watchdog follows. `call`
    /// gets the communicator and the stream; a non-blocking call that is still in progress is
    /// polled until NCCL has taken it.
    fn enqueue(
        &self,
        what: String,
        call: impl FnOnce(&Library, cudarc::nccl::sys::ncclComm_t, Stream) -> u32,
    ) -> Result<()> {
        self.check()?;
        self.bind()?;
        let event = |op: &str| {
            self.comm
                .record_event(None)
                .map_err(|e| device(&format!("NCCL {what} ({op})"), e))
        };
        let start = event("start event")?;
        let code = {
            let comm = self.shared.comm();
            if comm.0.is_null() {
                return Err(failed(
                    self.shared.failure().unwrap_or("communicator aborted"),
                ));
            }
            call(self.shared.lib, comm.0, self.comm.cu_stream() as Stream)
        };
        match code {
            SUCCESS => {}
            IN_PROGRESS => self.shared.settle(&what).map_err(|m| failed(&m))?,
            code => {
                let why = self.shared.lib.describe(code, std::ptr::null_mut());
                return Err(failed(
                    &self
                        .shared
                        .fail(format!("rank {}: {what} failed: {why}", self.rank)),
                ));
            }
        }
        self.shared.watch(start, event("end event")?, what);
        Ok(())
    }

    /// Copies `bytes` bytes on the stream.
    fn copy(&self, src: CUdeviceptr, dst: CUdeviceptr, bytes: usize, what: &str) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the callers pass ranges inside live buffers of at least `bytes` bytes.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.comm.cu_stream()) }
            .map_err(|e| device(&format!("NCCL {what} (cuMemcpyDtoDAsync)"), e))
    }

    /// Zeroes `buf[from..]`.
    fn zero_tail(&self, buf: &mut CudaBuf, from: usize) -> Result<()> {
        let size = buf.dtype.size();
        self.bind()?;
        // SAFETY: `from <= buf.len`, so the range lies in the buffer.
        unsafe {
            cu::memset_d8_async(
                buf.ptr + (from * size) as u64,
                0,
                (buf.len - from) * size,
                self.comm.cu_stream(),
            )
        }
        .map_err(|e| device("NCCL reduce_scatter (zeroing the padding)", e))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Finish what was enqueued (bounded by the watchdog), then stop the watchdog and leave
        // cleanly: finalize (flushes NCCL's work with the peers) and destroy; abort when that
        // fails or the communicator already failed. Errors have nobody left to go to.
        let healthy = self.wait().is_ok();
        self.shared.stop();
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let _ = self.bind();
        let lib = self.shared.lib;
        let comm = self.shared.comm().0;
        if comm.is_null() {
            return;
        }
        // SAFETY: a live communicator; only this thread uses it now (the watchdog has ended).
        let finalized = healthy
            && matches!(unsafe { (lib.finalize)(comm) }, SUCCESS | IN_PROGRESS)
            && self.shared.settle("finalize").is_ok();
        if finalized {
            let mut raw = self.shared.comm();
            // SAFETY: as above; the handle is cleared with it.
            let _ = unsafe { (lib.destroy)(raw.0) };
            raw.0 = std::ptr::null_mut();
        } else {
            self.shared.fail(format!(
                "rank {}: NCCL communicator closed after a failure",
                self.rank
            ));
        }
    }
}

/// `ncclSum`.
const SUM: u32 = ncclRedOp_t::ncclSum as u32;

fn dptr(p: CUdeviceptr) -> *mut std::ffi::c_void {
    p as usize as *mut std::ffi::c_void
}

fn failed(msg: &str) -> BackendError {
    BackendError::Device {
        op: "NCCL".into(),
        msg: msg.to_string(),
    }
}

fn device(op: &str, e: cudarc::driver::DriverError) -> BackendError {
    BackendError::Device {
        op: op.into(),
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests;
