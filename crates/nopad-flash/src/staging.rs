//! Page-locked staging buffers for the tile-list uploads, reused across plans.
//!
//! Each plan's tile lists reach the workspace by an async copy from page-locked host memory.
//! Allocating that memory per plan (`cuMemHostAlloc`) and freeing it when the plan drops
//! (`cuMemFreeHost`) costs two driver calls per micro-batch, and freeing may wait for the
//! device. Instead a plan borrows a buffer from this pool and returns it on drop together with
//! an event recorded after its last upload; a buffer is handed out again only once that event
//! has completed, so no copy can still be reading it.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use crate::error::driver;
use crate::FlashError;

/// Buffers kept for reuse; a returned buffer beyond this is freed (after its event).
const KEEP: usize = 4;

/// A page-locked buffer and the event recorded after the last copy that read it.
pub(crate) struct StagingBuf {
    buf: PinnedHostSlice<i32>,
    done: CudaEvent,
    /// Elements written by the current owner.
    len: usize,
}

impl Drop for StagingBuf {
    fn drop(&mut self) {
        // The pinned memory is freed right after this: wait for any copy still reading it.
        let _ = self.done.synchronize();
    }
}

impl StagingBuf {
    /// Copy `len` elements (the buffer's contents) to device address `dst` on `stream`, then
    /// record the event that guards the buffer's reuse.
    ///
    /// # Safety
    /// `dst` is a device allocation of at least `4 * len` bytes on `stream`'s context.
    pub(crate) unsafe fn upload(&self, stream: &CudaStream, dst: u64) -> Result<(), FlashError> {
        let src = self
            .buf
            .as_slice()
            .map_err(driver("pinned tile list slice"))?;
        cudarc::driver::result::memcpy_htod_async(dst, &src[..self.len], stream.cu_stream())
            .map_err(driver("uploading tile lists to the workspace"))?;
        self.done
            .record(stream)
            .map_err(driver("recording the tile-list upload"))
    }
}

/// The pool; shared by a `FlashAttention` and every plan it builds.
#[derive(Default)]
pub(crate) struct StagingPool {
    free: Mutex<Vec<StagingBuf>>,
}

impl StagingPool {
    /// A buffer holding `data`: a returned one whose last copy has finished and that is large
    /// enough, else a new one (capacity rounded up to a power of two, so growing batches soon
    /// stop allocating).
    pub(crate) fn take(
        &self,
        ctx: &Arc<CudaContext>,
        data: &[i32],
    ) -> Result<StagingBuf, FlashError> {
        let reused = {
            let mut free = self.free.lock().expect("staging pool mutex poisoned");
            let ready = free.iter().position(|b| {
                b.buf.len() >= data.len() && b.done.try_is_complete().unwrap_or(false)
            });
            ready.map(|i| free.swap_remove(i))
        };
        let mut b = match reused {
            Some(b) => b,
            None => {
                let cap = data.len().max(1024).next_power_of_two();
                // SAFETY: the buffer is written below before any copy reads it.
                let buf = unsafe { ctx.alloc_pinned::<i32>(cap) }
                    .map_err(driver("alloc_pinned for tile lists"))?;
                let done = ctx
                    .new_event(None)
                    .map_err(driver("creating an upload event"))?;
                StagingBuf { buf, done, len: 0 }
            }
        };
        let dst = b
            .buf
            .as_mut_slice()
            .map_err(driver("pinned tile list slice"))?;
        dst[..data.len()].copy_from_slice(data);
        b.len = data.len();
        Ok(b)
    }

    /// Return a buffer; its event guards the next `take`. Beyond `KEEP` buffers the oldest is
    /// freed (its drop waits for its event).
    pub(crate) fn give_back(&self, b: StagingBuf) {
        let dropped = {
            let mut free = self.free.lock().expect("staging pool mutex poisoned");
            free.push(b);
            if free.len() > KEEP {
                Some(free.remove(0))
            } else {
                None
            }
        };
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use cudarc::driver::DevicePtr;

    use crate::{FlashAttention, FlashDims};

    /// `cu_seqlens` and dims of packed sequences of `lens` tokens.
    fn batch(
        lens: &[usize],
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> (Vec<i32>, FlashDims) {
        let mut cu = vec![0i32];
        for &l in lens {
            cu.push(cu[cu.len() - 1] + l as i32);
        }
        let dims = FlashDims {
            n: cu[cu.len() - 1] as usize,
            n_seqs: lens.len(),
            max_seqlen: lens.iter().copied().max().unwrap_or(0).max(1),
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        };
        (cu, dims)
    }

    /// A plan's upload is queued behind a long forward, then the plan drops: its buffer must not
    /// be handed to the next plan (whose lists differ) before that copy has run, or the first
    /// workspace would receive the second plan's lists. Skips visibly without a GPU.
    #[test]
    fn a_buffer_is_not_reused_while_its_copy_may_still_read_it() {
        // SAFETY: only probes whether libcuda can be loaded.
        let ctx = match unsafe { cudarc::driver::sys::is_culib_present() } {
            true => cudarc::driver::CudaContext::new(0).ok(),
            false => None,
        };
        let Some(ctx) = ctx else {
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
            return;
        };
        let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
        let load = crate::ptx_loader(ctx.clone(), format!("{cuda_home}/include")).expect("loader");
        let fa = FlashAttention::new(&load).expect("kernels load");
        let s = &ctx.default_stream();
        // Keep the stream busy: forwards over 8192 tokens at Dh 128 (~2 ms each).
        let (big_cu, bd) = batch(&[8192], 32, 8, 128);
        let bplan = fa.plan(&big_cu, &bd).expect("plan");
        let qkv = s.alloc_zeros::<u16>(bd.n * (32 + 16) * 128).expect("alloc");
        let out = s.alloc_zeros::<u16>(bd.n * 32 * 128).expect("alloc");
        let lse = s.alloc_zeros::<f32>(bd.n * 32).expect("alloc");
        let bws = s
            .alloc_zeros::<u8>(fa.workspace_bytes(&bplan, &bd))
            .expect("alloc");
        let lens_a: Vec<usize> = (1..40).map(|i| 3 * i).collect();
        let lens_b: Vec<usize> = (1..40).map(|i| 5 * i + 1).collect();
        let (a_cu, a_dims) = batch(&lens_a, 4, 1, 64);
        let (b_cu, b_dims) = batch(&lens_b, 4, 1, 64);
        let plan_a = fa.plan(&a_cu, &a_dims).expect("plan a");
        let plan_b = fa.plan(&b_cu, &b_dims).expect("plan b");
        let host_a = plan_a.host.clone();
        assert_ne!(host_a, plan_b.host[..host_a.len().min(plan_b.host.len())]);
        let ws_a = s.alloc_zeros::<i32>(host_a.len()).expect("alloc");
        let ws_b = s.alloc_zeros::<i32>(plan_b.host.len()).expect("alloc");
        {
            let (p_qkv, _q) = qkv.device_ptr(s);
            let (p_out, _o) = out.device_ptr(s);
            let (p_lse, _l) = lse.device_ptr(s);
            let (p_ws, _w) = bws.device_ptr(s);
            let (p_a, _a) = ws_a.device_ptr(s);
            let (p_b, _b) = ws_b.device_ptr(s);
            for _ in 0..10 {
                // SAFETY: buffers sized for `big` above; the stream is the context's.
                unsafe { fa.forward(s, &bplan, &bd, p_qkv, 0, p_out, p_lse, p_ws) }
                    .expect("forward");
            }
            // SAFETY: ws_a / ws_b hold each plan's lists.
            unsafe { plan_a.upload(&fa.staging, s, p_a) }.expect("upload a");
            drop(plan_a);
            unsafe { plan_b.upload(&fa.staging, s, p_b) }.expect("upload b");
        }
        let got_a = s.clone_dtoh(&ws_a).expect("read a");
        let got_b = s.clone_dtoh(&ws_b).expect("read b");
        assert_eq!(got_a, host_a, "plan a's lists reached its workspace intact");
        assert_eq!(got_b, plan_b.host);
        // Once the stream is idle the returned buffer is reused (no new allocation).
        let before = fa.staging.free.lock().map(|f| f.len()).unwrap_or(0);
        drop(plan_b);
        let c = fa.plan(&a_cu, &a_dims).expect("plan c");
        let ws_c = s.alloc_zeros::<i32>(c.host.len()).expect("alloc");
        {
            let (p_c, _c) = ws_c.device_ptr(s);
            // SAFETY: ws_c holds c's lists.
            unsafe { c.upload(&fa.staging, s, p_c) }.expect("upload c");
        }
        let after = fa.staging.free.lock().map(|f| f.len()).unwrap_or(0);
        assert_eq!(after, before, "one buffer returned, one taken again");
        assert_eq!(s.clone_dtoh(&ws_c).expect("read c"), c.host);
    }
}
